//! `ebb prune`: deletes what no point and no fragment needs, in two phases, while
//! writers go on (`condemned`, `view`). Each run:
//!
//! 1. reads the condemned sets and rescues there are, then lists and reads every
//!    point and fragment and finds the packs they use (the live packs);
//! 2. sweeps the condemned sets older than the grace: deletes their fragments and
//!    WAL, then their packs that are neither live (a writer that had not yet seen
//!    the set used one) nor rescued by a writer, then the sets;
//! 3. condemns, in new sets, the packs that are not live, not rescued, not in a
//!    set still waiting, and older than the grace (a writer's packs are young until
//!    its point or fragment names them);
//!    With them it condemns the fragments a later point holds (outside the
//!    source's `pitr_within` window), and the packs only they use: the next sweep
//!    deletes the fragments, then those packs;
//! 4. deletes what nothing reads: index files all of whose packs are gone (and
//!    writes again those some of whose packs are gone, without them), forget
//!    records no index file needs, policies no longer in force, leases over for
//!    twice their lifetime, rescues that no set still waiting can need.
//!
//! A point or fragment that cannot be read stops the run before anything is
//! deleted: what it uses cannot be known. Two runs at once are harmless: they
//! condemn and delete the same things.
//!
//! Memory: the blobs points use, a record each, go to local disk past a quarter
//! of `max_memory` (`spill`), and are read back in pack order to weigh each pack
//! and to repack. The run still holds, in memory, a few words for each pack,
//! tree and object name.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::condemned::{object_name, parse_object_name, Condemned, Rescued, Timing, CONDEMNED_DIR, RESCUED_DIR};
use crate::error::RepoError;
use crate::forget::{ForgetRecord, FORGOTTEN_DIR};
use crate::fragment::{FragmentRef, FRAGS_DIR};
use crate::id::Id;
use crate::index::{encode_merged_records, open_index_records, IndexRecords, ENTRY_LEN, INDEX_DIR};
use crate::object::{open_object, seal_object, seal_object_raw};
use crate::pack::{pack_name, parse_pack_name, BlobRef, PACKS_DIR};
use crate::point::PgInfo;
use crate::point::PointRef;
use crate::policy::POLICIES_DIR;
use crate::repack::{choose, repack, Chosen, MaxUnused, PackUse, RepackReport};
use crate::repo::Repository;
use crate::spill::{Sorted, Spill};
use crate::tree_cache::{TreeCache, TreeUses};
use crate::wal::{mergeable, redundant, tli_dir, Lsn, WalKeep, WalPiece, WAL_DIR};

/// Objects read or deleted at once.
const IN_FLIGHT: usize = 16;
/// Packs a sweep names and deletes at once.
const DELETE_BATCH: usize = 4096;
/// The most names one condemned set holds (a few in unit tests, so that they
/// meet runs that write several).
const SET_NAMES: usize = if cfg!(test) { 3 } else { 100_000 };

#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    pub dry_run: bool,
    pub timing: Timing,
    /// Where a base backup's WAL starts and where it must reach, from its `pg`
    /// record (`streamer::pg::info`, which reads PostgreSQL's text for positions).
    /// Without it, or for a source with a base backup it cannot read, WAL is only
    /// compacted: none of it is deleted for being old.
    pub wal_positions: Option<WalPositions>,
    /// How much unused space may stay in packs still used before they are repacked.
    pub max_unused: MaxUnused,
    /// The memory the run may use, in bytes: past a quarter of it, the blobs the
    /// survey finds points using go to local disk (the cache directory, else the
    /// temporary one) and are read back in order.
    pub max_memory: u64,
}

/// `ebb prune --memory`'s default.
pub const MAX_MEMORY: u64 = 256 << 20;

/// Where a base backup's WAL starts and where it must reach, from its record.
pub type WalPositions = fn(&PgInfo) -> Option<(Lsn, Lsn)>;

/// What a run found and did. Counts of packs, and their stored bytes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub points: u64,
    pub fragments: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    pub live_packs: u64,
    pub live_bytes: u64,
    /// Condemned by this run, to be deleted by a run after the grace.
    pub condemned_packs: u64,
    pub condemned_bytes: u64,
    /// Deleted by this run (condemned by an earlier one).
    pub deleted_packs: u64,
    pub deleted_bytes: u64,
    /// Condemned earlier, but used again (by a point written since) or rescued.
    pub spared_packs: u64,
    /// Unused, but younger than the grace: condemned by a later run if still unused.
    pub young_packs: u64,
    /// Fragments a later point holds: condemned by this run, deleted by this run.
    pub condemned_fragments: u64,
    pub folded_fragments: u64,
    /// WAL pieces there were, and of them: condemned by this run (outside what kept
    /// base backups need, or held by a larger piece), deleted by this run.
    pub wal_pieces: u64,
    pub condemned_wal_pieces: u64,
    pub deleted_wal_pieces: u64,
    /// Segments whose pieces this run wrote again as one piece.
    pub merged_segments: u64,
    /// Condemned sets still within their grace.
    pub waiting_sets: u64,
    /// Other objects deleted: index files, forget records, old policies, condemned
    /// sets swept, rescues no longer needed.
    pub deleted_objects: u64,
    /// Index files written again without their entries in deleted packs.
    pub rewritten_index_files: u64,
    /// Small index files written again as a few larger ones (and deleted).
    pub merged_index_files: u64,
    /// Packs mostly unused, or small and many, whose used blobs this run wrote
    /// again into new packs (the old ones are condemned with the others).
    pub repack: RepackReport,
    /// Condemned sets or rescues that could not be read (never swept), objects the
    /// store refused to delete (tried again by a later run).
    pub problems: Vec<String>,
    /// When the sets waiting may be swept, at the earliest.
    pub next_sweep: Option<String>,
    /// Bytes of the survey written to local disk, past `max_memory`.
    pub spilled_bytes: u64,
    /// Trees whose uses this host's cache held: not read from the store.
    pub cached_trees: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(
        "{object} cannot be read, so what it uses cannot be known: prune deletes nothing until it can \
         (`ebb verify` says more; `ebb forget` can remove a damaged point): {cause}"
    )]
    Unreadable { object: String, cause: String },
    #[error(
        "cannot hold prune's working set on local disk in {dir}: {cause} (give it room, set EBB_CACHE_DIR \
         to a directory that has some, or raise --memory)"
    )]
    Spill { dir: String, cause: std::io::Error },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl From<crate::store::StoreError> for PruneError {
    fn from(e: crate::store::StoreError) -> PruneError {
        PruneError::Repo(e.into())
    }
}

/// A condemned set as a run holds it: its names packed into one string, since the
/// sets of a long history name objects by the hundred thousand.
struct Set {
    packs: std::collections::BTreeSet<Id>,
    names: Names,
}

impl Set {
    fn decode(bytes: &[u8]) -> Result<Set, crate::codec::DecodeError> {
        let Condemned { packs, names } = Condemned::decode(bytes)?;
        Ok(Set { packs, names: names.into_iter().collect() })
    }
}

/// Names one after the other in one string: each costs its bytes and eight more,
/// not an allocation of its own.
#[derive(Default)]
struct Names {
    text: String,
    ends: Vec<usize>,
}

impl Names {
    fn iter(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let name = &self.text[start..end];
            start = end;
            name
        })
    }
}

impl FromIterator<String> for Names {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Names {
        let mut out = Names::default();
        for name in names {
            out.text.push_str(&name);
            out.ends.push(out.text.len());
        }
        out.text.shrink_to_fit();
        out.ends.shrink_to_fit();
        out
    }
}

/// A condemned set or rescue there is.
struct Timed<T> {
    name: String,
    time: Timestamp,
    body: T,
}

pub async fn prune(
    repo: &Repository,
    opts: PruneOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PruneReport, PruneError> {
    let store = repo.store();
    let t0 = Timestamp::now();
    let grace = SignedDuration::try_from(opts.timing.grace).unwrap_or(SignedDuration::MAX);
    let mut report = PruneReport { dry_run: opts.dry_run, ..PruneReport::default() };

    // 1. What is condemned and rescued, then everything that uses packs. In that
    // order: a point written after a set, by a writer that had not seen it, is
    // listed here and keeps its packs.
    progress("condemned sets and rescues");
    let sets = read_timed(repo, CONDEMNED_DIR, Set::decode, &mut report.problems).await?;
    let rescues = read_timed(repo, RESCUED_DIR, Rescued::decode, &mut report.problems).await?;
    // Index files before packs: each is written after its packs, so a pack one of
    // these names that the listing below lacks is gone, not new (step 4). Index
    // files written later are left to the next run.
    let index_files = store.list_names(INDEX_DIR).await?;
    progress("packs");
    // Uploads interrupted writers left half-written, anywhere (writers sweep
    // packs/ and index/ only after one on their own host was interrupted): looked
    // for while the packs are listed, a walk of the repository beside a listing.
    let staged = async {
        match opts.dry_run {
            true => Ok(0),
            false => store.sweep_staged("", crate::store::STAGED_AGE).await,
        }
    };
    // A host's cache of what trees use, but for a store in memory (tests).
    let trees = (!store.url().starts_with("memory:")).then(crate::index_cache::cache_dir).flatten();
    // The survey beside the listing: a pack written after the listing is not in
    // it, so not condemned by this run, whenever the point using it was written;
    // a point the survey missed is a writer's, which the condemned sets answer
    // for (a pack listed that it uses is rescued, or young).
    let survey = survey(repo, opts.max_memory, trees.as_deref(), &mut report, progress);
    // The listing's names let go as soon as it is read, not held beside the survey.
    let listed = async {
        let listed = store.list(PACKS_DIR).await?;
        let packs: HashMap<Id, (u64, Option<Timestamp>)> =
            listed.into_iter().filter_map(|o| Some((parse_pack_name(&o.name)?, (o.size, o.modified)))).collect();
        Ok::<_, crate::store::StoreError>(packs)
    };
    let (staged, listed, survey) = futures::join!(staged, listed, survey);
    let mut survey = survey?;
    // Apart, so that it can be moved onto local disk while repacking, which the
    // sets borrowing the survey below would not allow.
    let mut uses = std::mem::replace(&mut survey.uses, Sorted::Held(Vec::new()));
    match staged {
        Ok(0) => {}
        Ok(n) => progress(&format!("removed {n} half-written uploads left by interrupted runs")),
        Err(e) => report.problems.push(e.to_string()),
    }
    // Packs deleted in the sweep leave this map: it is then what is there.
    let mut packs = listed?;
    report.packs = packs.len() as u64;
    report.pack_bytes = packs.values().map(|(s, _)| s).sum();
    let live = &survey.live;
    // Names are most of prune's memory at scale: those of fragments are held once,
    // in the survey, and the sets below borrow them.
    let fold: HashSet<&str> = foldable(repo, &survey).await?.into_iter().collect();
    let wal = wal_survey(repo, &survey, opts, &mut report, progress).await?;
    report.live_packs = live.len() as u64;
    report.live_bytes = live.iter().filter_map(|p| packs.get(p)).map(|(s, _)| s).sum();

    // Before packs or index files are deleted, a generation marker: a host's
    // merged copy of the index built before is built again (and one built during
    // the run, after the marker at its end). A run killed meanwhile has marked it
    // all the same.
    let mut marked = false;

    // 2. Sweep the sets whose grace is over.
    let rescued: HashSet<Id> = rescues.iter().flat_map(|r| r.body.packs.iter().copied()).collect();
    let rescued_names: HashSet<&str> = rescues.iter().flat_map(|r| r.body.names.iter().map(String::as_str)).collect();
    let (due, waiting): (Vec<&Timed<Set>>, Vec<&Timed<Set>>) =
        sets.iter().partition(|set| after(set.time, grace) <= t0);
    if !due.is_empty() {
        mark(repo, opts.dry_run, &mut marked).await?;
    }
    // Swept, but not all of it: the store refused some deletes.
    let mut unfinished: Vec<&Timed<Set>> = Vec::new();
    let mut deleted_names: HashSet<&str> = HashSet::new();
    // Sets swept in full: deleted last, once the index files no longer name their
    // packs, so that a writer finds a pack missing from the index only while a set
    // still says it is condemned.
    let mut swept: Vec<String> = Vec::new();
    // The objects of every set due first: fragments a later point holds and WAL no
    // kept base backup needs (still: a policy may have widened its window since),
    // unless a writer rescued them (the WAL of a base backup being taken).
    let mut names_refused = Vec::with_capacity(due.len());
    for set in &due {
        progress(&format!("sweep {}", set.name));
        let names: Vec<&str> = set
            .body
            .names
            .iter()
            .filter(|n| (fold.contains(n) || wal.contains(n)) && !rescued_names.contains(*n))
            .collect();
        let refused_names = delete_all(repo, &names, opts.dry_run, &mut report.problems).await;
        let done = |dir: &str| names.iter().filter(|n| n.starts_with(dir) && !refused_names.contains(**n)).count();
        report.folded_fragments += done(FRAGS_DIR) as u64;
        report.deleted_wal_pieces += done(WAL_DIR) as u64;
        deleted_names.extend(names.into_iter().filter(|n| !refused_names.contains(*n)));
        names_refused.push(!refused_names.is_empty());
    }
    // Then their packs that nothing left uses: no point, no fragment still there
    // (a set's fragments and their packs may lie in different sets of one run).
    // Any rescue spares: one written for a set may carry a time a little before it
    // (clocks disagree), and sparing more only deletes later.
    let live = survey.used_beside(|n| deleted_names.contains(n));
    for (set, names_refused) in due.iter().zip(names_refused) {
        let doomed: Vec<Id> =
            set.body.packs.iter().filter(|p| !live.contains(p) && !rescued.contains(p)).copied().collect();
        report.spared_packs += (set.body.packs.len() - doomed.len()) as u64;
        // Named a batch at a time: a set may hold hundreds of thousands.
        let mut refused = HashSet::new();
        for batch in doomed.chunks(DELETE_BATCH) {
            let names: Vec<String> = batch.iter().map(pack_name).collect();
            let refused_here = delete_all(repo, &strs(&names), opts.dry_run, &mut report.problems).await;
            for p in batch.iter().filter(|p| !refused_here.contains(&pack_name(p))) {
                if let Some((size, _)) = packs.remove(p) {
                    report.deleted_packs += 1;
                    report.deleted_bytes += size;
                }
            }
            refused.extend(refused_here);
        }
        // A set whose objects were not all deleted (the store refused: an object
        // lock, no permission) stays, and a later run tries again.
        if refused.is_empty() && !names_refused {
            swept.push(set.name.clone());
        } else {
            unfinished.push(set);
        }
    }
    drop(live);
    report.waiting_sets = waiting.len() as u64;
    report.next_sweep = waiting.iter().map(|s| after(s.time, grace)).min().map(|t| t.to_string());

    // 3. Condemn what nothing uses.
    let pending: HashSet<Id> = waiting.iter().chain(&unfinished).flat_map(|s| s.body.packs.iter().copied()).collect();
    let mut condemned = Condemned::default();

    // 2b. Repack packs mostly unused, and small ones when there are many: their
    // used blobs go into new packs, the points using them are written again, and
    // the old packs are condemned below with the unused ones.
    let young = |modified: &Option<Timestamp>| modified.is_none_or(|m| after(m, grace) > t0);
    let usage: Vec<PackUse> = survey
        .point_packs
        .iter()
        .filter_map(|(id, used)| {
            let (size, _) = packs.get(id)?;
            Some(PackUse { id: *id, size: *size, used_bytes: used.bytes, used_blobs: used.blobs })
        })
        .collect();
    let total_used: u64 = usage.iter().map(|u| u.used_bytes).sum();
    let total_unused: u64 = usage.iter().map(PackUse::unused_bytes).sum();
    let candidates: Vec<PackUse> = usage
        .into_iter()
        .filter(|u| {
            !survey.fragment_packs.contains(&u.id)
                && !pending.contains(&u.id)
                && !rescued.contains(&u.id)
                && packs.get(&u.id).is_some_and(|(_, m)| !young(m))
        })
        .collect();
    let chosen: HashSet<Id> = choose(&candidates, total_used, total_unused, opts.max_unused).into_iter().collect();
    // Packs whose every used blob is a tree the repack wrote again (and that no
    // fragment uses): used by nothing now, so condemned by this run, not the next.
    let mut emptied: HashSet<Id> = HashSet::new();
    if !chosen.is_empty() {
        let mut chosen: Vec<PackUse> = candidates.into_iter().filter(|u| chosen.contains(&u.id)).collect();
        // In the order the survey's records come back in.
        chosen.sort_unstable_by_key(|u| survey.numbers.number_of(&u.id));
        report.repack = if opts.dry_run {
            RepackReport {
                packs: chosen.len() as u64,
                bytes: chosen.iter().map(|u| u.size).sum(),
                used_bytes: chosen.iter().map(|u| u.used_bytes).sum(),
                ..RepackReport::default()
            }
        } else {
            let mut with_uses = Vec::with_capacity(chosen.len());
            let mut next = chosen.iter().peekable();
            for group in uses_by_pack(&uses, &survey.numbers) {
                let Some(pack) = next.peek() else { break };
                let (id, used) = group.map_err(spill_failed)?;
                if id == pack.id {
                    with_uses.push(Chosen { pack: **pack, used });
                    next.next();
                }
            }
            // The records wait on local disk while the repack needs the memory.
            uses = uses.onto_disk(&spill_dir()).map_err(spill_failed)?;
            let (repacked, replaced) = repack(repo, &with_uses, &survey.points, progress).await?;
            drop(with_uses);
            for group in uses_by_pack(&uses, &survey.numbers) {
                let (id, used) = group.map_err(spill_failed)?;
                if !survey.fragment_packs.contains(&id)
                    && used.iter().all(|(offset, _)| replaced.contains(&(id, *offset)))
                {
                    emptied.insert(id);
                }
            }
            repacked
        };
        for u in &chosen {
            condemned.packs.insert(u.id);
            report.condemned_bytes += u.size;
        }
    }
    drop(uses);

    // The packs of fragments condemned here (or deleted, or waiting) are condemned
    // with them: a sweep deletes them once it has deleted the fragments.
    let live_beside_fold = survey.used_beside(|n| fold.contains(n) || deleted_names.contains(n));
    for (id, (size, modified)) in &packs {
        let live = live_beside_fold.contains(id) && !emptied.contains(id);
        if live || pending.contains(id) || rescued.contains(id) {
            continue;
        }
        // A pack whose time the store does not give is taken as young.
        if young(modified) {
            report.young_packs += 1;
            continue;
        }
        condemned.packs.insert(*id);
        report.condemned_bytes += size;
    }
    report.condemned_packs = condemned.packs.len() as u64;
    // The packs a set condemns, this run's or one still waiting: step 4's merged
    // index files leave their entries out.
    let mut doomed = pending;
    doomed.extend(condemned.packs.iter().copied());
    let mut pending_names: HashSet<&str> =
        waiting.iter().chain(&unfinished).flat_map(|s| s.body.names.iter()).collect();
    pending_names.extend(&deleted_names);
    // Names in sets of at most SET_NAMES each, made as they are written, so that
    // however many there are only one set's worth is held; the packs go in the last.
    // (Collected first, as references and positions: a lazy iterator's closures
    // held across the writes would make this future not `Send`.)
    let fragments: Vec<&str> = fold.into_iter().filter(|n| !pending_names.contains(n)).collect();
    let wal_pieces: Vec<(&str, WalPiece)> = wal
        .pieces()
        .filter(|(source, p)| {
            let name = p.name(source);
            !pending_names.contains(name.as_str()) && !rescued_names.contains(name.as_str())
        })
        .collect();
    drop(pending_names);
    report.condemned_fragments = fragments.len() as u64;
    report.condemned_wal_pieces = wal_pieces.len() as u64;
    let total = fragments.len() + wal_pieces.len();
    let name_of = |i: usize| match fragments.get(i) {
        Some(f) => f.to_string(),
        None => {
            let (source, p) = &wal_pieces[i - fragments.len()];
            p.name(source)
        }
    };
    let mut wrote = false;
    let mut next = 0;
    loop {
        let mut set = Condemned::default();
        let end = total.min(next + SET_NAMES);
        set.names.extend((next..end).map(name_of));
        next = end;
        let last = next == total;
        if last {
            set.packs = std::mem::take(&mut condemned.packs);
        }
        if !set.is_empty() && !opts.dry_run {
            write_set(repo, &set).await?;
            wrote = true;
        }
        if last {
            break;
        }
    }
    if wrote {
        let due = after(Timestamp::now(), grace);
        report.next_sweep = Some(report.next_sweep.map_or(due.to_string(), |t| t.min(due.to_string())));
    }
    // What the steps before needed and step 4 does not: let go before it reads and
    // merges index files, so that the two never add up.
    drop((survey, live_beside_fold, deleted_names));

    // 4. What nothing reads any more.
    progress("index files and records");
    let gone = |p: &Id| !packs.contains_key(p);
    let mut obsolete: Vec<String> = Vec::new();
    let mut indexed_points: HashSet<String> = HashSet::new();
    // Index files kept, with few entries: merged when there are many. Gathered in
    // a batch as they are read, up to what one merged file holds; the names of the
    // others, read again if they are merged.
    let mut batch = MergedIndex::default();
    let mut small: Vec<String> = Vec::new();
    // The points forget removed, whose names merged files do not carry over (their
    // forget records said it, and can go once no index file names them).
    let forgotten = match opts.dry_run {
        true => HashSet::new(),
        false => crate::forget::forgotten_points(repo).await?.0,
    };
    let reads = index_files.into_iter().map(|name| async move {
        let got = store.get(&name).await;
        (name, got)
    });
    let mut reads = stream::iter(reads).buffered(IN_FLIGHT);
    while let Some((name, got)) = reads.next().await {
        let Ok(bytes) = got else { continue };
        let Ok(mut file) = open_index_records(repo.keys(), &name, bytes) else { continue };
        // In place: a merged file holds up to hundreds of thousands of entries.
        let before = file.len();
        file.retain_packs(|pack| !gone(pack));
        if file.len() == before {
            indexed_points.extend(file.points.iter().cloned());
            if file.len() < SMALL_INDEX && !opts.dry_run {
                if batch.entries.len() < MERGED_ENTRIES {
                    batch.add(&name, file, &forgotten, &doomed);
                } else {
                    small.push(name);
                }
            }
            continue;
        }
        // What is left goes into a replacement, written before the old one goes:
        // a writer reading the index meanwhile finds one or both.
        if !file.is_empty() {
            report.rewritten_index_files += 1;
            indexed_points.extend(file.points.iter().cloned());
            if !opts.dry_run {
                let name = Repository::new_index_name();
                let small_one = file.len() < SMALL_INDEX;
                let sealed = file.seal(repo.keys(), &name);
                store.put_new(&name, Bytes::from(sealed)).await?;
                if small_one {
                    small.push(name);
                }
            }
        }
        obsolete.push(name);
    }
    if !opts.dry_run && batch.replaced.len() + small.len() > MERGE_ABOVE {
        progress("merging index files");
        batch.write(repo, &mut report).await?;
        merge_index_files(repo, &small, &forgotten, &doomed, &mut report).await?;
    } else {
        drop(batch);
    }
    for obj in store.list(FORGOTTEN_DIR).await? {
        let Ok(bytes) = store.get(&obj.name).await else { continue };
        let Ok(record) = ForgetRecord::open(repo.keys(), &obj.name, &bytes) else { continue };
        if record.points.iter().all(|p| !indexed_points.contains(p)) {
            obsolete.push(obj.name);
        }
    }
    for source in store.list_dirs(POLICIES_DIR).await? {
        let mut names: Vec<String> =
            store.list(&format!("{POLICIES_DIR}/{source}")).await?.into_iter().map(|o| o.name).collect();
        names.sort();
        // The first name is the newest, in force.
        obsolete.extend(names.into_iter().skip(1));
    }
    // Leases long over: a writer that may not delete leaves its old ones behind.
    let over =
        t0.checked_sub(SignedDuration::from_secs(2 * crate::lease::TTL.as_secs() as i64)).unwrap_or(Timestamp::MIN);
    for obj in store.list(crate::lease::LEASES_DIR).await? {
        if crate::point::parse_timed(crate::lease::LEASES_DIR, &obj.name).is_some_and(|(_, t)| t < over) {
            obsolete.push(obj.name);
        }
    }
    // A rescue is for a set written at most a little (clocks) after it: once older
    // than the grace, and older by the grace than every set still waiting, it is
    // for none of them. A writer still using its packs rescues them again if a
    // later run condemns them.
    let oldest_waiting = waiting.iter().chain(&unfinished).map(|s| s.time).min();
    for r in &rescues {
        if after(r.time, grace) <= t0 && oldest_waiting.is_none_or(|w| after(r.time, grace) < w) {
            obsolete.push(r.name.clone());
        }
    }
    if obsolete.iter().any(|n| n.starts_with(INDEX_DIR)) {
        mark(repo, opts.dry_run, &mut marked).await?;
    }
    let refused = delete_all(repo, &strs(&obsolete), opts.dry_run, &mut report.problems).await;
    report.deleted_objects += (obsolete.len() - refused.len()) as u64;
    let refused = delete_all(repo, &strs(&swept), opts.dry_run, &mut report.problems).await;
    report.deleted_objects += (swept.len() - refused.len()) as u64;
    if marked {
        crate::generation::bump(repo).await?;
        let old = crate::generation::superseded(store).await?;
        delete_all(repo, &strs(&old), false, &mut report.problems).await;
    }
    Ok(report)
}

/// Writes a generation marker (§13) before the run's first deletion of packs or
/// index files, once.
async fn mark(repo: &Repository, dry_run: bool, marked: &mut bool) -> Result<(), PruneError> {
    if !dry_run && !*marked {
        crate::generation::bump(repo).await?;
        *marked = true;
    }
    Ok(())
}

/// More small index files than this, and prune merges them: a writer reads every
/// index file when it starts, and one is written with every point.
const MERGE_ABOVE: usize = 16;
/// An index file with fewer entries than this is small.
const SMALL_INDEX: usize = 100_000;
/// A merged index file holds about this many entries at most (and fewer than a
/// small file more): its entries, their encoding and the sealed file are held at
/// once when it is written, about 60 MB. In tests, a few: the files past the first
/// batch are read again.
const MERGED_ENTRIES: usize = if cfg!(test) { 30 } else { 200_000 };

/// Writes the index files `names` again as a few larger ones (version 3, naming
/// all their points but the `forgotten` ones), each before the files it replaces
/// are deleted: a writer reading the index meanwhile finds an entry in one or
/// both. One that cannot be read (gone meanwhile: another prune merged it) is left
/// out.
async fn merge_index_files(
    repo: &Repository,
    names: &[String],
    forgotten: &HashSet<String>,
    doomed: &HashSet<Id>,
    report: &mut PruneReport,
) -> Result<(), RepoError> {
    let store = repo.store();
    let mut batch = MergedIndex::default();
    let reads = names.iter().cloned().map(|name| async move {
        let got = store.get(&name).await;
        (name, got)
    });
    let mut reads = stream::iter(reads).buffered(IN_FLIGHT);
    while let Some((name, got)) = reads.next().await {
        let Ok(bytes) = got else { continue };
        let Ok(file) = open_index_records(repo.keys(), &name, bytes) else { continue };
        batch.add(&name, file, forgotten, doomed);
        // Each batch written as it fills: at most one is held.
        if batch.entries.len() >= MERGED_ENTRIES {
            std::mem::take(&mut batch).write(repo, report).await?;
        }
    }
    batch.write(repo, report).await
}

/// Index files being merged into one.
#[derive(Default)]
struct MergedIndex {
    points: std::collections::BTreeSet<String>,
    /// Entries repeat across index files: each is kept once when written. Held as
    /// they are written (`entry_record`), so that the file is made in their buffer.
    entries: Vec<[u8; ENTRY_LEN]>,
    replaced: Vec<String>,
}

impl MergedIndex {
    /// Writes the merged file, then deletes the files it replaces (if more than one).
    async fn write(mut self, repo: &Repository, report: &mut PruneReport) -> Result<(), RepoError> {
        if self.replaced.len() < 2 {
            return Ok(());
        }
        // Sorted, equal entries meet (a hash set of them would take twice the memory).
        crate::spill::sort_unique(&mut self.entries);
        let name = Repository::new_index_name();
        let points: Vec<String> = self.points.into_iter().collect();
        // Uncompressed: ids do not compress, and the file is sealed in the entries'
        // buffer, never held twice.
        let plain = encode_merged_records(&points, self.entries);
        let sealed = seal_object_raw(repo.keys(), &name, plain);
        repo.store().put_new(&name, Bytes::from(sealed)).await?;
        let refused = delete_all(repo, &strs(&self.replaced), false, &mut report.problems).await;
        let gone = (self.replaced.len() - refused.len()) as u64;
        report.merged_index_files += gone;
        report.deleted_objects += gone;
        Ok(())
    }

    /// Adds the entries of index file `name` but those of `doomed` packs (a writer
    /// that would have found a blob in one stores it again, where it would have
    /// rescued the pack), and its points but the `forgotten` ones.
    fn add(&mut self, name: &str, mut file: IndexRecords, forgotten: &HashSet<String>, doomed: &HashSet<Id>) {
        file.retain_packs(|pack| !doomed.contains(pack));
        if self.entries.capacity() == 0 {
            // All the room it can need, once: growing by doubling would hold twice
            // that while it copies (and the file's header fits in what is left).
            self.entries.reserve_exact(MERGED_ENTRIES + SMALL_INDEX + 64);
        }
        self.entries.extend(file.records());
        self.points.extend(file.points.into_iter().filter(|p| !forgotten.contains(p)));
        self.replaced.push(name.to_string());
    }
}

/// `t + d`, or the end of time: times come from names and the store, which may
/// hold anything.
fn after(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// Every condemned set or rescue in `dir`, oldest first; one that cannot be read is
/// a problem, and is neither swept nor trusted.
async fn read_timed<T>(
    repo: &Repository,
    dir: &str,
    decode: fn(&[u8]) -> Result<T, crate::codec::DecodeError>,
    problems: &mut Vec<String>,
) -> Result<Vec<Timed<T>>, RepoError> {
    let names = repo.store().list(dir).await?;
    let reads = names.into_iter().map(|o| async move {
        let Some(time) = parse_object_name(dir, &o.name) else {
            return Ok((o.name.clone(), Err("not a name ebb makes".to_string()), Timestamp::MIN));
        };
        match repo.store().get(&o.name).await {
            Ok(bytes) => {
                let body = open_object(repo.keys(), &o.name, &bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|plain| decode(&plain).map_err(|e| e.to_string()));
                Ok((o.name, body.map(Some), time))
            }
            Err(e) if e.is_not_found() => Ok((o.name, Ok(None), time)),
            Err(e) => Err(RepoError::from(e)),
        }
    });
    let read: Vec<_> = stream::iter(reads).buffer_unordered(IN_FLIGHT).try_collect().await?;
    let mut out = Vec::new();
    for (name, body, time) in read {
        match body {
            Ok(Some(body)) => out.push(Timed { name, time, body }),
            Ok(None) => {}
            Err(e) => problems.push(format!("{name} cannot be read, and is left as it is: {e}")),
        }
    }
    out.sort_by_key(|t| t.time);
    Ok(out)
}

/// What the points and fragments there are use, and what of them prune may fold.
struct Survey {
    /// The packs every point and fragment uses.
    live: HashSet<Id>,
    /// Every blob points use, by pack and offset, each once: held in memory or on
    /// local disk (`spill`).
    uses: Sorted<USE_LEN>,
    /// The numbers `uses` gives packs.
    numbers: PackNumbers,
    /// The packs points use, and what of each.
    point_packs: HashMap<Id, Used>,
    /// The packs fragments use: never repacked.
    fragment_packs: HashSet<Id>,
    /// Every point read.
    points: Vec<PointRef>,
    /// The newest point of each source.
    newest: HashMap<String, Timestamp>,
    /// Every fragment, by source.
    fragments: HashMap<String, Vec<Surveyed>>,
    /// Every point's time and WAL record (base backups have one), by source,
    /// oldest first.
    bases: HashMap<String, Vec<(Timestamp, Option<PgInfo>)>>,
}

/// A fragment as the survey holds it, in as little memory as it can: there may be
/// hundreds of thousands.
struct Surveyed {
    name: Box<str>,
    time: Timestamp,
    /// The packs it uses, each once.
    packs: Box<[Id]>,
}

/// What of a pack points use.
#[derive(Default, Clone, Copy)]
struct Used {
    bytes: u64,
    blobs: u64,
}

/// A blob a point uses, as the survey keeps it: the number of its pack
/// (`PackNumbers`), then its offset and length, big-endian, so that records sort
/// by pack, then offset. A pack's id would take 32 bytes of the 40: the survey
/// sorts a record for each file of each tree it reads.
const USE_LEN: usize = 12;

/// The packs the survey's records name, numbered in the order they were met.
#[derive(Default)]
struct PackNumbers {
    ids: Vec<Id>,
    numbers: HashMap<Id, u32>,
}

impl PackNumbers {
    fn number(&mut self, pack: &Id) -> u32 {
        *self.numbers.entry(*pack).or_insert_with(|| {
            self.ids.push(*pack);
            self.ids.len() as u32 - 1
        })
    }

    fn number_of(&self, pack: &Id) -> Option<u32> {
        self.numbers.get(pack).copied()
    }

    /// The pack a record names. A run read back from local disk is not trusted:
    /// a number never given is an error.
    fn parse(&self, r: &[u8; USE_LEN]) -> std::io::Result<(Id, (u32, u32))> {
        let word = |at: usize| u32::from_be_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]);
        let pack = self.ids.get(word(0) as usize).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "a spilled record names a pack never numbered")
        })?;
        Ok((*pack, (word(4), word(8))))
    }

    fn record(&mut self, pack: &Id, offset: u32, length: u32) -> [u8; USE_LEN] {
        use_of(self.number(pack), offset, length)
    }
}

fn use_of(pack: u32, offset: u32, length: u32) -> [u8; USE_LEN] {
    let mut r = [0u8; USE_LEN];
    r[..4].copy_from_slice(&pack.to_be_bytes());
    r[4..8].copy_from_slice(&offset.to_be_bytes());
    r[8..].copy_from_slice(&length.to_be_bytes());
    r
}

/// Where the survey's records go past its budget: the cache directory, else the
/// temporary one.
fn spill_dir() -> std::path::PathBuf {
    crate::index_cache::cache_dir().map_or_else(std::env::temp_dir, |d| d.join("spill"))
}

fn spill_failed(cause: std::io::Error) -> PruneError {
    PruneError::Spill { dir: spill_dir().display().to_string(), cause }
}

/// Each pack points use, in order, with the (offset, length) of each of its
/// blobs in use, sorted.
fn uses_by_pack<'a>(
    uses: &'a Sorted<USE_LEN>,
    numbers: &'a PackNumbers,
) -> impl Iterator<Item = std::io::Result<(Id, Vec<(u32, u32)>)>> + 'a {
    let mut records = uses.iter().map(|r| r.and_then(|r| numbers.parse(&r))).peekable();
    std::iter::from_fn(move || {
        let (pack, first) = match records.next()? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let mut blobs = vec![first];
        while let Some(Ok((next, blob))) = records.peek() {
            if *next != pack {
                break;
            }
            blobs.push(*blob);
            records.next();
        }
        Some(Ok((pack, blobs)))
    })
}

impl Survey {
    /// The packs the points use, and the fragments but those `gone` names.
    fn used_beside(&self, gone: impl Fn(&str) -> bool) -> HashSet<Id> {
        let mut used: HashSet<Id> = self.point_packs.keys().copied().collect();
        for f in self.fragments.values().flatten() {
            if !gone(&f.name) {
                used.extend(f.packs.iter().copied());
            }
        }
        used
    }
}

/// What every point and fragment uses.
async fn survey(
    repo: &Repository,
    max_memory: u64,
    cache_dir: Option<&std::path::Path>,
    report: &mut PruneReport,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Survey, PruneError> {
    let unreadable = |object: &str, e: &dyn std::fmt::Display| PruneError::Unreadable {
        object: object.to_string(),
        cause: e.to_string(),
    };
    let mut points = Vec::new();
    let mut newest = HashMap::new();
    let mut bases: HashMap<String, Vec<(Timestamp, Option<PgInfo>)>> = HashMap::new();
    let mut spill = Spill::<USE_LEN>::new(max_memory / 4, &spill_dir());
    let mut numbers = PackNumbers::default();
    // Trees by place, not content id (the same tree may be stored twice), each
    // read once, IN_FLIGHT at a time: on an object store each read is a round
    // trip. Each with the point it was first reached from, which an unreadable
    // tree is reported against.
    let mut seen_trees: HashSet<(Id, u32)> = HashSet::new();
    let mut pending: Vec<(BlobRef, usize)> = Vec::new();
    for source in repo.sources().await? {
        let listed = repo.points(&source).await?;
        if let Some(p) = listed.last() {
            newest.insert(source.clone(), p.time);
        }
        // Owned items (see the fragments below).
        let reads = listed.into_iter().map(|point| {
            let repo = repo.clone();
            async move {
                let manifest = repo.manifest(&point).await;
                (point, manifest)
            }
        });
        let mut reads = stream::iter(reads).buffered(IN_FLIGHT);
        while let Some((point, manifest)) = reads.next().await {
            progress(&format!("point {}", point.name));
            report.points += 1;
            let manifest = match manifest {
                Ok(m) => m,
                // Forgotten since it was listed.
                Err(RepoError::Store(e)) if e.is_not_found() => continue,
                Err(e) => return Err(unreadable(&point.name, &e)),
            };
            bases.entry(source.clone()).or_default().push((point.time, manifest.pg.clone()));
            if let Some(root) = manifest.root_ref() {
                if seen_trees.insert((root.pack, root.offset)) {
                    pending.push((root, points.len()));
                }
            }
            points.push(point);
        }
    }
    // What trees use, from this host's cache where it holds them; the others are
    // read from the store (and added to it).
    let mut cache = cache_dir.map(|dir| TreeCache::open(dir, &repo.id(), repo.keys()));
    let mut reading = futures::stream::FuturesUnordered::new();
    loop {
        while reading.len() < IN_FLIGHT {
            let Some((tree_ref, from)) = pending.pop() else { break };
            if let Some(uses) = cache.as_mut().and_then(|c| c.get(&tree_ref)) {
                surveyed(&tree_ref, &uses, from, &mut spill, &mut numbers, &mut seen_trees, &mut pending)?;
                continue;
            }
            let repo = repo.clone();
            reading.push(async move { (tree_ref, from, repo.read_tree(&tree_ref).await) });
        }
        let Some((tree_ref, from, tree)) = reading.next().await else { break };
        let tree = tree.map_err(|e| unreadable(&points[from].name, &e))?;
        let uses = TreeUses::of(&tree);
        drop(tree);
        if let Some(c) = &mut cache {
            c.put(&tree_ref, &uses);
        }
        surveyed(&tree_ref, &uses, from, &mut spill, &mut numbers, &mut seen_trees, &mut pending)?;
    }
    drop(reading);
    drop(seen_trees);
    if let Some(c) = cache {
        report.cached_trees = c.hits;
        c.finish();
    }
    report.spilled_bytes = spill.spilled();
    let uses = spill.finish().map_err(spill_failed)?;
    let mut point_packs: HashMap<Id, Used> = HashMap::new();
    for r in uses.iter() {
        let (pack, (_, length)) = r.and_then(|r| numbers.parse(&r)).map_err(spill_failed)?;
        let used = point_packs.entry(pack).or_default();
        used.bytes += u64::from(length);
        used.blobs += 1;
    }
    let mut out = Survey {
        live: point_packs.keys().copied().collect(),
        uses,
        numbers,
        point_packs,
        fragment_packs: HashSet::new(),
        points,
        newest,
        fragments: HashMap::new(),
        bases,
    };
    let store = repo.store();
    for source in store.list_dirs(FRAGS_DIR).await? {
        progress(&format!("fragments of {source}"));
        let refs: Vec<FragmentRef> = store
            .list_names(&format!("{FRAGS_DIR}/{source}"))
            .await?
            .iter()
            .filter_map(|n| FragmentRef::parse(n))
            .collect();
        // Each fragment is read and let go: only the packs it uses are kept.
        // Owned items: a closure taking a reference makes this future not Send,
        // which `stream --prune-every` needs.
        let reads = refs.iter().cloned().enumerate().map(|(i, f)| async move {
            match repo.fragment(&f).await {
                Ok(frag) => {
                    let mut packs: Vec<Id> = frag.growths.iter().flat_map(|g| &g.chunks).map(|b| b.pack).collect();
                    packs.sort_unstable();
                    packs.dedup();
                    Ok(Some((i, packs)))
                }
                // Deleted since the listing: it uses nothing.
                Err(RepoError::Store(e)) if e.is_not_found() => Ok(None),
                Err(e) => Err(unreadable(&f.name, &e)),
            }
        });
        let mut uses: Vec<Box<[Id]>> = vec![Box::default(); refs.len()];
        let mut reads = stream::iter(reads).buffer_unordered(IN_FLIGHT);
        while let Some(read) = reads.try_next().await? {
            let Some((i, packs)) = read else { continue };
            report.fragments += 1;
            out.fragment_packs.extend(packs.iter().copied());
            uses[i] = packs.into_boxed_slice();
        }
        drop(reads);
        let surveyed =
            refs.into_iter().zip(uses).map(|(f, packs)| Surveyed { name: f.name.into(), time: f.time, packs });
        out.fragments.insert(source.clone(), surveyed.collect());
    }
    out.live.extend(out.fragment_packs.iter().copied());
    Ok(out)
}

/// A tree surveyed: its own place and the data blobs it uses to the records, the
/// trees below it not seen before to those still to read.
fn surveyed(
    tree: &BlobRef,
    uses: &TreeUses,
    from: usize,
    spill: &mut Spill<USE_LEN>,
    numbers: &mut PackNumbers,
    seen_trees: &mut HashSet<(Id, u32)>,
    pending: &mut Vec<(BlobRef, usize)>,
) -> Result<(), PruneError> {
    spill.push(numbers.record(&tree.pack, tree.offset, tree.length)).map_err(spill_failed)?;
    // The blobs of a tree lie in a few packs, one after another.
    let mut last: Option<(&Id, u32)> = None;
    for (pack, offset, length) in &uses.data {
        let n = match last {
            Some((p, n)) if p == pack => n,
            _ => numbers.number(pack),
        };
        last = Some((pack, n));
        spill.push(use_of(n, *offset, *length)).map_err(spill_failed)?;
    }
    let fresh = uses.subtrees.iter().filter(|sub| seen_trees.insert((sub.pack, sub.offset)));
    pending.extend(fresh.map(|sub| (*sub, from)));
    Ok(())
}

/// The fragments a later point holds (it stores every file at least as far as
/// the fragments before it had it), except those within the source's
/// `pitr_within` window, whose every moment must stay restorable.
async fn foldable<'a>(repo: &Repository, survey: &'a Survey) -> Result<Vec<&'a str>, RepoError> {
    let mut out = Vec::new();
    for (source, fragments) in &survey.fragments {
        let Some(&newest) = survey.newest.get(source) else { continue };
        let until = pitr_start(repo, source, newest).await?.map_or(newest, |start| start.min(newest));
        out.extend(fragments.iter().filter(|f| f.time <= until).map(|f| &*f.name));
    }
    Ok(out)
}

/// Where the `pitr_within` window of `source` starts, counted back from its newest
/// point, if its policy has one.
async fn pitr_start(repo: &Repository, source: &str, newest: Timestamp) -> Result<Option<Timestamp>, RepoError> {
    let Some(p) = repo.policy(source).await? else { return Ok(None) };
    let Some(span) = p.policy.pitr_within else { return Ok(None) };
    Ok(Some(newest.to_zoned(p.policy.zone()?).checked_sub(span).map_or(Timestamp::MIN, |z| z.timestamp())))
}

/// The WAL pieces prune may condemn: those no kept base backup needs (`WalKeep`:
/// from the base backup the `pitr_within` window starts from, or the newest, on;
/// and each one's own span), and those a larger piece holds. Before that, unless
/// this is a dry run, each segment held in several pieces is written as one.
async fn wal_survey(
    repo: &Repository,
    survey: &Survey,
    opts: PruneOptions,
    report: &mut PruneReport,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<WalPieces, RepoError> {
    let store = repo.store();
    let mut out = WalPieces::default();
    for source in store.list_dirs(WAL_DIR).await? {
        let Some(system) = repo.wal_system(&source).await? else { continue };
        progress(&format!("WAL of {source}"));
        let keep = match (opts.wal_positions, survey.bases.get(&source)) {
            (Some(positions), Some(bases)) if !bases.is_empty() => {
                let newest = bases[bases.len() - 1].0;
                let pitr = pitr_start(repo, &source, newest).await?;
                let keep = wal_keep(bases, pitr, positions);
                if keep.is_none() {
                    report.problems.push(format!(
                        "the WAL of {source} is kept whole: a point of it does not say which WAL it needs"
                    ));
                }
                keep
            }
            _ => None,
        };
        for tli_name in store.list_dirs(&format!("{WAL_DIR}/{source}")).await? {
            let Some(tli) = (tli_name.len() == 8).then(|| u32::from_str_radix(&tli_name, 16).ok()).flatten() else {
                continue; // history, files
            };
            let mut pieces: Vec<WalPiece> = store
                .list_names(&tli_dir(&source, tli))
                .await?
                .iter()
                .filter_map(|n| WalPiece::parse(tli, n))
                .collect();
            report.wal_pieces += pieces.len() as u64;
            if !opts.dry_run {
                let needed: Vec<WalPiece> =
                    pieces.iter().filter(|p| keep.as_ref().is_none_or(|k| k.needs(p))).cloned().collect();
                for (start, end) in mergeable(&needed, system.segment_size) {
                    if let Some(merged) = repo.merge_wal(&source, &system, tli, start, end).await? {
                        report.merged_segments += 1;
                        pieces.push(merged);
                    }
                }
            }
            let mut condemnable: HashSet<(u64, u64)> =
                redundant(&pieces).iter().map(|p| (p.start.0, p.end.0)).collect();
            if let Some(k) = &keep {
                condemnable.extend(pieces.iter().filter(|p| !k.needs(p)).map(|p| (p.start.0, p.end.0)));
            }
            if !condemnable.is_empty() {
                out.dirs
                    .insert(tli_dir(&source, tli), TimelinePieces { source: source.clone(), tli, spans: condemnable });
            }
        }
    }
    Ok(out)
}

/// WAL pieces, by timeline directory: as names, for a set, and asked about by
/// name. Held as positions, a quarter of the memory of their names.
#[derive(Default)]
struct WalPieces {
    /// `wal/<source>/<tli>` -> its pieces.
    dirs: HashMap<String, TimelinePieces>,
}

/// Pieces of one timeline of one source, as their (start, end).
struct TimelinePieces {
    source: String,
    tli: u32,
    spans: HashSet<(u64, u64)>,
}

impl WalPieces {
    fn contains(&self, name: &str) -> bool {
        let Some((dir, _)) = name.rsplit_once('/') else { return false };
        let Some(t) = self.dirs.get(dir) else { return false };
        WalPiece::parse(t.tli, name).is_some_and(|p| t.spans.contains(&(p.start.0, p.end.0)))
    }

    /// Each piece, with its source.
    fn pieces(&self) -> impl Iterator<Item = (&str, WalPiece)> + '_ {
        self.dirs.values().flat_map(|t| {
            t.spans.iter().map(move |&(start, end)| {
                (t.source.as_str(), WalPiece { tli: t.tli, start: Lsn(start), end: Lsn(end) })
            })
        })
    }
}

/// What of the WAL the kept base backups of a source need: every position from
/// the start of the one the `pitr_within` window starts from (the newest at or
/// before `pitr`, or the oldest), or of the newest without a window; and from
/// each one's start to its stop. `None`, keeping all, when a point's positions
/// cannot be read.
fn wal_keep(
    bases: &[(Timestamp, Option<PgInfo>)],
    pitr: Option<Timestamp>,
    positions: WalPositions,
) -> Option<WalKeep> {
    let spans: Vec<(Lsn, Lsn)> =
        bases.iter().map(|(_, pg)| pg.as_ref().and_then(positions)).collect::<Option<Vec<_>>>()?;
    let anchor = match pitr {
        Some(start) => bases.iter().rposition(|(t, _)| *t <= start).unwrap_or(0),
        None => bases.len() - 1,
    };
    Some(WalKeep { from: spans[anchor].0, spans })
}

/// Writes `set` as a new condemned set, durable when this returns.
async fn write_set(repo: &Repository, set: &Condemned) -> Result<(), RepoError> {
    let now = Timestamp::now();
    let name = object_name(CONDEMNED_DIR, now).ok_or(RepoError::BadTime { time: now.to_string() })?;
    let sealed = seal_object(repo.keys(), &name, &set.encode());
    repo.store().put_new(&name, Bytes::from(sealed)).await?;
    Ok(())
}

fn strs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

/// Deletes `names` (unless `dry_run`), a few at once. What the store refuses to
/// delete (an object lock's retention, no permission, unreachable) is noted in
/// `problems` and returned: a later run tries again.
async fn delete_all(repo: &Repository, names: &[&str], dry_run: bool, problems: &mut Vec<String>) -> HashSet<String> {
    let mut refused = HashSet::new();
    if dry_run {
        return refused;
    }
    for (name, e) in repo.store().delete_many(names).await {
        problems.push(format!("cannot delete {name} (a later run tries again): {e}"));
        refused.insert(name);
    }
    refused
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::keyslot::{Secret, DEFAULT_KDF};
    use crate::pack::BlobKind;
    use crate::point::{Manifest, PointRef};
    use crate::store::Store;
    use crate::tree::{Entry, EntryKind, Extent, Tree};
    use crate::writer::{WriteError, Writer};

    const GRACE: Duration = Duration::from_millis(1500);

    fn timing() -> Timing {
        Timing::with_grace(GRACE)
    }

    fn content(seed: u8) -> Vec<u8> {
        (0..200_000u32).map(|i| (i.wrapping_mul(seed as u32 + 3) % 251) as u8).collect()
    }

    /// Stores a one-file point of `data` through `w` and commits it.
    async fn point(w: &Arc<Writer>, data: Vec<u8>) -> Result<(PointRef, BlobRef), RepoError> {
        point_of(w, "s", data, None).await
    }

    /// `point` of `source`, with a WAL record if it is a base backup.
    async fn point_of(
        w: &Arc<Writer>,
        source: &str,
        data: Vec<u8>,
        pg: Option<PgInfo>,
    ) -> Result<(PointRef, BlobRef), RepoError> {
        let w2 = w.clone();
        let (root, blob) = tokio::task::spawn_blocking(move || {
            let mut p = w2.packer();
            let blob = p.store(BlobKind::Data, &data).unwrap();
            let mut file = Entry::new(b"f".to_vec(), EntryKind::File);
            file.size = data.len() as u64;
            file.content = vec![Extent::Data(blob)];
            let root = p.store(BlobKind::Tree, &Tree { entries: vec![file] }.encode()).unwrap();
            p.flush().unwrap();
            (root, blob)
        })
        .await
        .unwrap();
        let durable = w.checkpoint().await.map_err(|e| match e {
            WriteError::Repo(e) => e,
            other => panic!("{other}"),
        })?;
        let time = Timestamp::now();
        let mut m = Manifest::new(source, time, "h".into(), "dir", "/p".into(), root);
        m.index = durable.summary.index.clone();
        m.pg = pg;
        Ok((durable.commit(&m, time).await?, blob))
    }

    /// A base backup's WAL record, positions in decimal (`positions` reads them).
    fn base(start: u64, stop: u64) -> PgInfo {
        PgInfo {
            system_id: 7,
            timeline: 1,
            start_lsn: start.to_string(),
            stop_lsn: stop.to_string(),
            server_version: "15".into(),
            segment_size: SEG,
        }
    }

    fn positions(pg: &PgInfo) -> Option<(Lsn, Lsn)> {
        Some((Lsn(pg.start_lsn.parse().ok()?), Lsn(pg.stop_lsn.parse().ok()?)))
    }

    const SEG: u64 = 1 << 20;

    /// Condemnable WAL pieces, held as positions, answer for their names and give
    /// them back; other names, timelines and sources are not theirs.
    #[test]
    fn wal_pieces_held_as_positions_answer_for_their_names() {
        let mut set = WalPieces::default();
        let piece = |tli, s, e| WalPiece { tli, start: Lsn(s), end: Lsn(e) };
        let held = [piece(1, 0, 0x100), piece(1, 0x100, 0x2000)];
        let spans = held.iter().map(|p| (p.start.0, p.end.0)).collect();
        set.dirs.insert(tli_dir("db", 1), TimelinePieces { source: "db".into(), tli: 1, spans });
        for p in &held {
            assert!(set.contains(&p.name("db")));
        }
        let mut names: Vec<String> = set.pieces().map(|(source, p)| p.name(source)).collect();
        names.sort();
        assert_eq!(names, held.iter().map(|p| p.name("db")).collect::<Vec<_>>());
        for other in [piece(1, 0, 0x200).name("db"), piece(2, 0, 0x100).name("db"), piece(1, 0, 0x100).name("dc")] {
            assert!(!set.contains(&other), "{other}");
        }
        for junk in ["", "wal", "wal/db/00000001/", "wal/db/00000001/zz-yy", "frags/db/1-2"] {
            assert!(!set.contains(junk), "{junk}");
        }
    }

    async fn run_wal(repo: &Repository) -> PruneReport {
        let opts = PruneOptions {
            dry_run: false,
            timing: timing(),
            wal_positions: Some(positions),
            max_unused: MaxUnused::default(),
            max_memory: MAX_MEMORY,
        };
        prune(repo, opts, &|_| {}).await.unwrap()
    }

    /// Waits until a writer has written a rescue (its refresher runs on its own).
    async fn wait_rescued(repo: &Repository) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while repo.store().list(RESCUED_DIR).await.unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "nothing in use was ever rescued");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn run(repo: &Repository) -> PruneReport {
        run_with(repo, false, MaxUnused::default()).await
    }

    async fn run_with(repo: &Repository, dry_run: bool, max_unused: MaxUnused) -> PruneReport {
        let opts = PruneOptions { dry_run, timing: timing(), wal_positions: None, max_unused, max_memory: MAX_MEMORY };
        prune(repo, opts, &|_| {}).await.unwrap()
    }

    async fn verified(repo: &Repository) {
        let r = crate::verify(repo, true, &|_| {}).await.unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    /// `ebb forget` of one point.
    async fn forget(repo: &Repository, p: &PointRef) {
        let v = crate::forget::Verdict { point: p.clone(), reasons: Vec::new(), keep: false };
        let sv = crate::forget::SourceVerdicts { source: p.source.clone(), policy: None, points: vec![v] };
        crate::forget::forget(repo, &[sv], "h").await.unwrap();
    }

    async fn exists(repo: &Repository, pack: &Id) -> bool {
        repo.store().size(&pack_name(pack)).await.is_ok()
    }

    async fn repo() -> Repository {
        Repository::init(Store::memory(), &Secret::KeyFile([4; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0
    }

    /// What no point uses is condemned once older than the grace, and deleted by a
    /// run after the grace; a writer that uses a condemned pack rescues it; a
    /// writer started after the condemnation stores that content again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn condemned_then_swept_and_a_pack_in_use_is_rescued() {
        let repo = repo().await;
        let (a, blob_a) = point(&Writer::with_timing(repo.clone(), timing()).await.unwrap(), content(1)).await.unwrap();
        let (_b, blob_b) =
            point(&Writer::with_timing(repo.clone(), timing()).await.unwrap(), content(2)).await.unwrap();
        // Forgotten: its pack is used by nothing.
        forget(&repo, &a).await;
        // A writer that knows pack A and uses it, before anything is condemned.
        let user = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        let u2 = user.clone();
        let again =
            tokio::task::spawn_blocking(move || u2.packer().store(BlobKind::Data, &content(1)).unwrap()).await.unwrap();
        assert_eq!(again, blob_a, "deduplicated against the pack about to be condemned");

        let young = run(&repo).await;
        assert_eq!((young.condemned_packs, young.young_packs), (0, 1), "{young:?}");
        tokio::time::sleep(GRACE).await;
        let marked = run(&repo).await;
        assert_eq!((marked.condemned_packs, marked.deleted_packs), (1, 0), "{marked:?}");
        assert!(exists(&repo, &blob_a.pack).await, "condemned, not deleted");

        // A writer started now does not take the condemned pack.
        let fresh = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        let f2 = fresh.clone();
        let stored =
            tokio::task::spawn_blocking(move || f2.packer().store(BlobKind::Data, &content(1)).unwrap()).await.unwrap();
        assert_ne!(stored.pack, blob_a.pack, "a condemned pack is not deduplicated against");
        drop(fresh);

        // The user looks again within its refresh, and rescues the pack.
        wait_rescued(&repo).await;
        tokio::time::sleep(GRACE).await;
        let swept = run(&repo).await;
        assert_eq!((swept.deleted_packs, swept.spared_packs), (0, 1), "{swept:?}");
        assert!(exists(&repo, &blob_a.pack).await && exists(&repo, &blob_b.pack).await);
        // ... and its point may use it.
        let (c, _) = point(&user, content(1)).await.unwrap();
        verified(&repo).await;

        // Once no point uses it and no writer rescues it, it goes.
        drop(user);
        forget(&repo, &c).await;
        assert_eq!(run(&repo).await.condemned_packs, 1);
        tokio::time::sleep(GRACE).await;
        let last = run(&repo).await;
        assert_eq!(last.deleted_packs, 1, "{last:?}");
        assert!(!exists(&repo, &blob_a.pack).await && exists(&repo, &blob_b.pack).await);
        assert!(repo.store().list(RESCUED_DIR).await.unwrap().is_empty(), "the rescue went with it");
        verified(&repo).await;
    }

    /// A writer that stopped looking at what prune condemns for longer than its view
    /// may live commits nothing that uses a pack condemned or deleted meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_writer_commits_nothing_that_uses_a_pruned_pack() {
        let stalled = Timing { grace: GRACE, view_ttl: Duration::from_millis(300), refresh: Duration::from_secs(3600) };
        for swept in [false, true] {
            let repo = repo().await;
            let (a, _) = point(&Writer::with_timing(repo.clone(), timing()).await.unwrap(), content(1)).await.unwrap();
            forget(&repo, &a).await;
            let w = Writer::with_timing(repo.clone(), stalled).await.unwrap();
            tokio::time::sleep(GRACE).await;
            assert_eq!(run(&repo).await.condemned_packs, 1);
            if swept {
                tokio::time::sleep(GRACE).await;
                assert_eq!(run(&repo).await.deleted_packs, 1);
            }
            // Its view has lapsed: the pack it deduplicates against was condemned
            // (or deleted) since, and its commit refuses.
            let r = point(&w, content(1)).await;
            assert!(matches!(r, Err(RepoError::Pruned { .. })), "swept {swept}: {r:?}");
            assert!(repo.points("s").await.unwrap().is_empty(), "nothing committed");
        }
    }

    /// Fragments a later point holds are condemned and then deleted, unless they
    /// lie within the source's `pitr_within` window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fragments_a_later_point_holds_are_folded_outside_the_pitr_window() {
        for window in [false, true] {
            let repo = repo().await;
            // Four fragments, each with a pack of its own: more names than one set
            // holds in unit tests, so the packs lie in another set than some of them.
            let mut chunks = Vec::new();
            for i in 0..4u8 {
                let mut b = crate::fragment::FragmentBuilder::new(&repo);
                let chunk = b.store(&content(5 + 10 * i));
                let growth = crate::fragment::Growth {
                    device: 1,
                    inode: 2,
                    from: 0,
                    mtime: crate::tree::Timestamp { sec: 1, nsec: 0 },
                    chunks: vec![chunk],
                };
                let frag = crate::fragment::Fragment { growths: vec![growth] };
                b.commit(&repo, "s", Timestamp::now(), &frag).await.unwrap();
                chunks.push(chunk);
            }
            if window {
                let policy =
                    crate::retention::Policy { pitr_within: Some(jiff::Span::new().hours(1)), ..Default::default() };
                repo.set_policy("s", policy, "h".into()).await.unwrap();
            }
            // A point after it: it holds what the fragment carried.
            point(&Writer::with_timing(repo.clone(), timing()).await.unwrap(), content(6)).await.unwrap();
            // Its pack is no longer young.
            tokio::time::sleep(GRACE).await;
            let marked = run(&repo).await;
            let want = if window { 0 } else { 4 };
            assert_eq!(marked.condemned_fragments, want, "window {window}: {marked:?}");
            let sets = repo.store().list(CONDEMNED_DIR).await.unwrap().len();
            assert_eq!(sets, if window { 0 } else { 2 }, "window {window}");
            tokio::time::sleep(GRACE).await;
            let swept = run(&repo).await;
            assert_eq!(swept.folded_fragments, want, "window {window}: {swept:?}");
            let left = repo.store().list(&format!("{FRAGS_DIR}/s")).await.unwrap();
            assert_eq!(left.len() as u64, 4 - want, "window {window}");
            // The fragments' packs, which no point uses, are condemned with them and
            // deleted after them in the same sweep; within the window all stay.
            assert_eq!(marked.condemned_packs, want, "window {window}: {marked:?}");
            assert_eq!(swept.deleted_packs, want, "window {window}: {swept:?}");
            for chunk in &chunks {
                assert_eq!(exists(&repo, &chunk.pack).await, window);
            }
            verified(&repo).await;
        }
    }

    /// An index file some of whose packs were deleted is written again without
    /// them: a writer's index then names only packs that exist.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_index_file_is_written_again_without_the_packs_deleted() {
        let repo = repo().await;
        let w = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        // One pack that the point will not use, stored by the same writer.
        let w2 = w.clone();
        let unused = tokio::task::spawn_blocking(move || {
            let mut p = w2.packer();
            let b = p.store(BlobKind::Data, &content(9)).unwrap();
            p.flush().unwrap();
            b
        })
        .await
        .unwrap();
        let (_, used) = point(&w, content(8)).await.unwrap();
        assert_ne!(unused.pack, used.pack);
        tokio::time::sleep(GRACE).await;
        assert_eq!(run(&repo).await.condemned_packs, 1);
        tokio::time::sleep(GRACE).await;
        let swept = run(&repo).await;
        assert_eq!((swept.deleted_packs, swept.rewritten_index_files), (1, 1), "{swept:?}");
        let inventory = crate::inventory::Inventory::load(&repo).await.unwrap();
        assert_eq!(inventory.index_files.len(), 1);
        assert_eq!(inventory.missing().0, 0, "no index entry names a deleted pack");
        assert_eq!(inventory.index_files[0].1.points.len(), 1, "the replacement names the point");
        verified(&repo).await;
    }

    /// An index file written while a run lists the packs names packs the listing
    /// lacks: it is left to the next run, not taken for one of packs gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_index_file_written_during_a_run_is_left_alone() {
        let faults = crate::faults::Faults::new();
        let store = Store::memory().with_faults(faults.clone());
        let repo = Repository::init(store, &Secret::KeyFile([4; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        new_point(&repo, vec![content(1)]).await;
        // The run's listing of the packs waits; a point is written meanwhile. The
        // write starts once the run is inside that listing (the fault has fired);
        // should it outlast the wait, the test still passes, and only proves less.
        faults.nth(crate::faults::Op::List, "packs", 1, crate::faults::Fault::Delay(Duration::from_secs(5)));
        let running = tokio::spawn({
            let repo = repo.clone();
            async move { run(&repo).await }
        });
        while faults.fired() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let w = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        let (during, _) = point(&w, content(2)).await.unwrap();
        let index = repo.manifest(&during).await.unwrap().index.expect("the point has an index file");
        let report = running.await.unwrap();
        assert_eq!(faults.fired(), 1, "the listing waited");
        assert_eq!((report.rewritten_index_files, report.deleted_objects), (0, 0), "{report:?}");
        assert!(repo.store().get(&index).await.is_ok(), "the new point's index file is still there");
        verified(&repo).await;
    }

    /// A store that refuses some deletes (an object lock's retention, no
    /// permission): prune says so, deletes the rest, keeps the set, and a later run
    /// finishes once the store lets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deletes_the_store_refuses_are_tried_again_later() {
        let faults = crate::faults::Faults::new();
        let store = Store::memory().with_faults(faults.clone());
        let repo = Repository::init(store, &Secret::KeyFile([4; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let (a, blob) = point(&Writer::with_timing(repo.clone(), timing()).await.unwrap(), content(1)).await.unwrap();
        forget(&repo, &a).await;
        tokio::time::sleep(GRACE).await;
        assert_eq!(run(&repo).await.condemned_packs, 1);
        tokio::time::sleep(GRACE).await;
        faults.always(crate::faults::Op::Delete, "packs/", crate::faults::Fault::Fail);
        let refused = run(&repo).await;
        assert_eq!((refused.deleted_packs, refused.waiting_sets), (0, 0), "{refused:?}");
        assert!(refused.problems.iter().any(|p| p.contains("cannot delete packs/")), "{refused:?}");
        assert!(exists(&repo, &blob.pack).await);
        assert_eq!(repo.store().list(CONDEMNED_DIR).await.unwrap().len(), 1, "the set stays for a later run");
        faults.clear();
        let later = run(&repo).await;
        assert_eq!(later.deleted_packs, 1, "{later:?}");
        assert!(!exists(&repo, &blob.pack).await);
        assert!(repo.store().list(CONDEMNED_DIR).await.unwrap().is_empty());
        verified(&repo).await;
    }

    /// Leases long over, left by writers that may not delete, go; a lease in
    /// force stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_long_over_are_deleted() {
        let repo = repo().await;
        let old = Timestamp::now() - SignedDuration::from_secs(3600);
        let old_name = crate::point::timed_name_with("leases", "s", old, "00112233aabbccdd").unwrap();
        let fresh_name = crate::point::timed_name_with("leases", "s", Timestamp::now(), "00112233aabbccdd").unwrap();
        for n in [&old_name, &fresh_name] {
            repo.store().put_new(n, Bytes::from_static(b"a lease")).await.unwrap();
        }
        run(&repo).await;
        let left: Vec<String> = repo.store().list("leases").await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(left, [fresh_name]);
    }

    /// Half-written uploads that interrupted writers left on a `file://` store go,
    /// wherever they are, once older than any put takes; a fresh one stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_written_uploads_left_anywhere_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().display()), true).unwrap();
        let repo = Repository::init(store, &Secret::KeyFile([4; 32]), DEFAULT_KDF, "t".into()).await.unwrap().0;
        let staged = |name: &str, age: Duration| {
            let path = dir.path().join(format!("{}#1", crate::store::local_path(name)));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let f = std::fs::File::create(&path).unwrap();
            f.set_modified(std::time::SystemTime::now() - age).unwrap();
            path
        };
        let hour = Duration::from_secs(3600);
        let old = [
            staged("wal/db/00000001/0000000001000000-0000000001000100", hour),
            staged("points/s/e78601e9e44897ff-0123456789abcdef", hour),
            staged("packs/ab/ab00", hour),
        ];
        let fresh = staged("frags/s/e78601e9e44897ff-0123456789abcdef", Duration::ZERO);
        run(&repo).await;
        assert!(old.iter().all(|p| !p.exists()), "{old:?}");
        assert!(fresh.exists(), "a put may still be making it");
    }

    /// A dry run deletes and writes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dry_run_changes_nothing() {
        let repo = repo().await;
        let (a, _) = point(&Writer::with_timing(repo.clone(), timing()).await.unwrap(), content(1)).await.unwrap();
        forget(&repo, &a).await;
        tokio::time::sleep(GRACE).await;
        let before = repo.store().sample(1000).await.unwrap();
        let r = run_with(&repo, true, MaxUnused::default()).await;
        assert_eq!(r.condemned_packs, 1);
        let mut after = repo.store().sample(1000).await.unwrap();
        let mut before = before;
        before.sort();
        after.sort();
        assert_eq!(before, after);
    }

    /// WAL no kept base backup needs is deleted after the grace; segments held in
    /// several pieces are merged into one and the pieces deleted; the WAL from the
    /// start of a base backup still being taken is rescued by its writer, even when
    /// it started before the newest base backup kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_no_kept_base_backup_needs_goes_and_segments_are_merged() {
        let repo = repo().await;
        let system = crate::wal::WalSystem { system_id: 7, segment_size: SEG };
        repo.claim_wal_system("db", system).await.unwrap();
        let wal: Vec<u8> = (0..4 * SEG).map(|i| (i * 13 % 253) as u8).collect();
        let quarter = SEG / 4;
        for q in 0..16 {
            let piece = WalPiece { tli: 1, start: Lsn(q * quarter), end: Lsn((q + 1) * quarter) };
            let bytes = &wal[(q * quarter) as usize..((q + 1) * quarter) as usize];
            repo.put_wal("db", &piece, Timestamp::now(), bytes).await.unwrap();
        }
        let w = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        let (a, _) = point_of(&w, "db", content(1), Some(base(SEG / 2, SEG / 2 + 100))).await.unwrap();
        // A base backup taken meanwhile, started before the next one, ends after it.
        let slow = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        slow.need_wal("db", 1, Lsn(SEG + SEG / 5)).await.unwrap();
        point_of(&w, "db", content(2), Some(base(2 * SEG + SEG / 2, 2 * SEG + SEG / 2 + 100))).await.unwrap();
        forget(&repo, &a).await;

        let first = run_wal(&repo).await;
        assert_eq!(first.wal_pieces, 16, "{first:?}");
        // Segment 3 is merged; segment 2 is not all needed (the newest base backup
        // starts in its middle), so its pieces stay as they are.
        assert_eq!(first.merged_segments, 1, "{first:?}");
        // Segments 0 and 1, half of segment 2, the four pieces of segment 3.
        assert_eq!(first.condemned_wal_pieces, 4 + 4 + 2 + 4, "{first:?}");
        let sets = repo.store().list(CONDEMNED_DIR).await.unwrap();
        assert_eq!(sets.len(), 5, "14 names, at most three a set here: {sets:?}");
        // The slow writer sees the set and rescues what it needs: all from its
        // start on (where it stops, it does not know yet).
        // Two graces on, the set is swept, and the rescue is over with it.
        wait_rescued(&repo).await;
        tokio::time::sleep(2 * GRACE).await;
        let second = run_wal(&repo).await;
        assert_eq!(second.deleted_wal_pieces, 4, "segment 0 only: {second:?}");
        assert_eq!(second.condemned_wal_pieces, 0, "what was rescued is not condemned again: {second:?}");
        assert!(repo.store().list(RESCUED_DIR).await.unwrap().is_empty());

        // Once the slow base backup is a point, it is the newest (a point's time is
        // when it was taken in full): all from its start on is kept, and merged.
        point_of(&slow, "db", content(3), Some(base(SEG + SEG / 5, SEG + SEG / 5 + 100))).await.unwrap();
        let third = run_wal(&repo).await;
        assert_eq!(third.merged_segments, 2, "{third:?}");
        // The small pieces of segments 1 to 3 are redundant.
        assert_eq!(third.condemned_wal_pieces, 12, "{third:?}");
        tokio::time::sleep(GRACE).await;
        assert_eq!(run_wal(&repo).await.deleted_wal_pieces, 12);
        let left = repo.wal_pieces("db", &system, 1, Lsn(0), Lsn(u64::MAX)).await.unwrap();
        let spans: Vec<(u64, u64)> = left.iter().map(|p| (p.start.0 / SEG, p.end.0 / SEG)).collect();
        assert_eq!(spans, [(1, 2), (2, 3), (3, 4)], "one piece per segment: {left:?}");
        let path = [(1, Lsn(0), None)];
        let read = repo.wal_bytes("db", &system, &path, Lsn(0), Lsn(4 * SEG)).await.unwrap();
        assert!(read.is_empty(), "segment 0 is gone");
        let read = repo.wal_bytes("db", &system, &path, Lsn(SEG + SEG / 5), Lsn(4 * SEG)).await.unwrap();
        assert_eq!(read, wal[(SEG + SEG / 5) as usize..]);
        verified(&repo).await;
    }

    /// Many small index files (one a point) are merged into a few (two here: the
    /// first batch gathered as the files are read, the rest read again): a writer
    /// starting after it still finds all content stored, `verify` still tells a
    /// lost manifest from a forgotten one, and nothing else changes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_index_files_are_merged() {
        let repo = repo().await;
        let w = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        let mut points = Vec::new();
        for seed in 0..20u8 {
            points.push(point(&w, content(seed)).await.unwrap().0);
        }
        assert_eq!(repo.store().list(INDEX_DIR).await.unwrap().len(), 20);
        forget(&repo, &points[0]).await;
        let r = run(&repo).await;
        assert_eq!(r.merged_index_files, 20, "{r:?}");
        let files = repo.store().list(INDEX_DIR).await.unwrap();
        assert_eq!(files.len(), 2);
        let (mut merged_points, mut entries) = (Vec::new(), 0);
        for f in &files {
            let merged =
                crate::index::open_index(repo.keys(), &f.name, &repo.store().get(&f.name).await.unwrap()).unwrap();
            merged_points.extend(merged.points);
            entries += merged.entries.len();
        }
        merged_points.sort();
        let mut kept: Vec<String> = points[1..].iter().map(|p| p.name.clone()).collect();
        kept.sort();
        assert_eq!(merged_points, kept, "every point but the forgotten one, once");
        assert_eq!(entries, 40, "the forgotten point's content is still indexed until it is deleted");
        assert_eq!(run(&repo).await.merged_index_files, 0, "two files are few enough to be left as they are");
        assert!(repo.store().list(FORGOTTEN_DIR).await.unwrap().is_empty(), "no index file needs the record now");
        verified(&repo).await;

        // Everything stored is found again: a new point of old content adds nothing.
        let w = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        let again = w.known(BlobKind::Data, &repo.keys().content_id(&content(7)));
        assert!(again.is_some(), "content of a merged index file is deduplicated");

        // A manifest lost (not forgotten) is still found missing.
        repo.store().delete(&points[3].name).await.unwrap();
        let report = crate::verify(&repo, false, &|_| {}).await.unwrap();
        assert!(report.errors.iter().any(|e| e.contains(&points[3].name) && e.contains("missing")), "{report:?}");
    }

    /// Merged index files leave out the entries of packs a set condemns: a writer
    /// started after stores that content again rather than take it from a pack
    /// about to go. After the sweep, every point kept reads the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merged_index_files_leave_out_what_a_set_condemns() {
        let repo = repo().await;
        let w = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        let mut points = Vec::new();
        for seed in 0..20u8 {
            points.push(point(&w, content(seed)).await.unwrap());
        }
        drop(w);
        let (first, gone) = points[0].clone();
        forget(&repo, &first).await;
        tokio::time::sleep(GRACE).await;
        let r = run(&repo).await;
        assert_eq!(r.merged_index_files, 20, "{r:?}");
        assert!(r.condemned_packs >= 1 && exists(&repo, &gone.pack).await, "condemned, not yet deleted: {r:?}");
        let mut indexed = HashSet::new();
        for f in repo.store().list(INDEX_DIR).await.unwrap() {
            let file =
                crate::index::open_index(repo.keys(), &f.name, &repo.store().get(&f.name).await.unwrap()).unwrap();
            indexed.extend(file.entries.iter().map(|e| e.blob.pack));
        }
        assert!(!indexed.contains(&gone.pack), "the condemned pack's entries are left out");
        // The small packs were merged: the kept content is indexed where it now is.
        assert!(r.repack.packs >= 19, "{r:?}");
        let w = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        for (_, b) in &points[1..] {
            let now = w.known(BlobKind::Data, &b.id).expect("kept content is indexed");
            assert!(now.pack != b.pack && indexed.contains(&now.pack), "in a new pack, not a condemned one");
        }
        assert!(w.known(BlobKind::Data, &gone.id).is_none());
        let (again, stored) = point(&w, content(0)).await.unwrap();
        assert_ne!(stored.pack, gone.pack, "stored again, in a pack of its own");
        drop(w);
        tokio::time::sleep(GRACE).await;
        run(&repo).await;
        assert!(!exists(&repo, &gone.pack).await, "swept");
        assert_eq!(repo.read_blob(BlobKind::Data, &stored).await.unwrap(), content(0));
        assert!(repo.points("s").await.unwrap().contains(&again));
        verified(&repo).await;
    }

    /// 200 kB that do not compress.
    fn noise(seed: u64) -> Vec<u8> {
        crate::chunker::tests::noise(200_000, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// A point of one file for each of `files`, through `w`.
    async fn point_files(w: &Arc<Writer>, files: Vec<Vec<u8>>) -> PointRef {
        let w2 = w.clone();
        let root = tokio::task::spawn_blocking(move || {
            let mut p = w2.packer();
            let mut entries = Vec::new();
            for (i, data) in files.iter().enumerate() {
                let mut file = Entry::new(format!("f{i}").into_bytes(), EntryKind::File);
                file.size = data.len() as u64;
                file.content = vec![Extent::Data(p.store(BlobKind::Data, data).unwrap())];
                entries.push(file);
            }
            let root = p.store(BlobKind::Tree, &Tree { entries }.encode()).unwrap();
            p.flush().unwrap();
            root
        })
        .await
        .unwrap();
        commit_root(w, root).await
    }

    /// A point of the tree at `root`, which `w` stored.
    async fn commit_root(w: &Arc<Writer>, root: BlobRef) -> PointRef {
        let durable = w.checkpoint().await.unwrap();
        let time = Timestamp::now();
        let mut m = Manifest::new("s", time, "h".into(), "dir", "/p".into(), root);
        m.index = durable.summary.index.clone();
        durable.commit(&m, time).await.unwrap()
    }

    /// A point of one file for each of `files`, through a writer of its own.
    async fn new_point(repo: &Repository, files: Vec<Vec<u8>>) -> PointRef {
        point_files(&Writer::with_timing(repo.clone(), timing()).await.unwrap(), files).await
    }

    /// The files of a point, read back, and the packs they are in.
    async fn read_point(repo: &Repository, p: &PointRef) -> (Vec<Vec<u8>>, HashSet<Id>) {
        let root = repo.manifest(p).await.unwrap().root_ref().unwrap();
        let mut packs = HashSet::from([root.pack]);
        let mut out = Vec::new();
        for e in repo.read_tree(&root).await.unwrap().entries {
            let mut data = Vec::new();
            for x in &e.content {
                let Extent::Data(b) = x else { continue };
                packs.insert(b.pack);
                data.extend_from_slice(&repo.read_blob(BlobKind::Data, b).await.unwrap());
            }
            out.push(data);
        }
        (out, packs)
    }

    /// A pack half unused (a forgotten point's file) is repacked: the point that
    /// still uses it is written again, under its name, to use a new pack, and reads
    /// the same; the old pack is condemned. A writer that took a blob from the old
    /// pack before rescues it, so it outlives the sweep; once nothing uses it, it
    /// goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn packs_mostly_unused_are_repacked_and_a_writer_using_them_keeps_them() {
        let repo = repo().await;
        let first = new_point(&repo, vec![noise(1), noise(2)]).await;
        let (_, old_packs) = read_point(&repo, &first).await;
        assert_eq!(old_packs.len(), 1);
        let old = *old_packs.iter().next().unwrap();
        let kept = new_point(&repo, vec![noise(1), noise(3)]).await;
        let (files, packs) = read_point(&repo, &kept).await;
        assert!(packs.contains(&old), "the first file is deduplicated");
        forget(&repo, &first).await;
        // A writer that takes the first file from the old pack before the repack.
        let user = Writer::with_timing(repo.clone(), timing()).await.unwrap();
        let u2 = user.clone();
        let taken =
            tokio::task::spawn_blocking(move || u2.packer().store(BlobKind::Data, &noise(1)).unwrap()).await.unwrap();
        assert_eq!(taken.pack, old);
        tokio::time::sleep(GRACE).await;

        let dry = run_with(&repo, true, MaxUnused::default()).await;
        assert_eq!((dry.repack.packs, dry.repack.rewritten_points), (1, 0), "{dry:?}");
        let unlimited = run_with(&repo, true, MaxUnused::UNLIMITED).await;
        assert_eq!(unlimited.repack.packs, 0, "{unlimited:?}");

        let repacked = run(&repo).await;
        assert_eq!((repacked.repack.packs, repacked.repack.rewritten_points), (1, 1), "{repacked:?}");
        assert!(repacked.condemned_packs >= 1, "{repacked:?}");
        let (again, packs) = read_point(&repo, &kept).await;
        assert_eq!(again, files, "the point reads the same");
        assert!(!packs.contains(&old), "and no longer uses the old pack");
        assert_eq!(repo.points("s").await.unwrap(), vec![kept.clone()], "under its own name");
        verified(&repo).await;

        // The writer sees the condemnation and rescues the old pack; the sweep spares it.
        wait_rescued(&repo).await;
        tokio::time::sleep(GRACE).await;
        let swept = run(&repo).await;
        assert!(swept.spared_packs >= 1 && exists(&repo, &old).await, "{swept:?}");
        let mine = point_files(&user, vec![noise(1)]).await;
        drop(user);
        verified(&repo).await;

        // Its point does not use the old pack: a writer that sees a pack condemned
        // stores again what it holds. Nothing uses it now, and it goes.
        tokio::time::sleep(GRACE).await;
        run(&repo).await;
        tokio::time::sleep(GRACE).await;
        run(&repo).await;
        assert!(!exists(&repo, &old).await);
        assert_eq!(read_point(&repo, &kept).await.0, files);
        assert_eq!(read_point(&repo, &mine).await.0, vec![noise(1)]);
        verified(&repo).await;
    }

    /// A pack chosen for repacking whose used blob does not open (a flipped bit)
    /// stops the run before any point is written again: the point still names the
    /// old pack, which is kept, and nothing was condemned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_pack_stops_the_repack_before_any_point_is_replaced() {
        let repo = repo().await;
        let first = new_point(&repo, vec![noise(1), noise(2)]).await;
        let kept = new_point(&repo, vec![noise(1), noise(3)]).await;
        forget(&repo, &first).await;
        tokio::time::sleep(GRACE).await;
        let root = repo.manifest(&kept).await.unwrap().root_ref().unwrap();
        let tree = repo.read_tree(&root).await.unwrap();
        let Extent::Data(used) = tree.entries[0].content[0] else { panic!("a data extent") };
        let name = pack_name(&used.pack);
        let mut bytes = repo.store().get(&name).await.unwrap().to_vec();
        bytes[used.offset as usize + 100] ^= 1;
        repo.store().put_overwrite(&name, Bytes::from(bytes)).await.unwrap();
        tokio::time::sleep(GRACE).await; // written anew: young again
        let manifest = repo.store().get(&kept.name).await.unwrap();

        let opts = PruneOptions {
            dry_run: false,
            timing: timing(),
            wal_positions: None,
            max_unused: MaxUnused::default(),
            max_memory: MAX_MEMORY,
        };
        let err = prune(&repo, opts, &|_| {}).await.unwrap_err();
        assert!(matches!(&err, PruneError::Repo(RepoError::DamagedPack { pack, .. }) if *pack == name), "{err}");
        assert_eq!(repo.store().get(&kept.name).await.unwrap(), manifest, "the point is as it was");
        assert!(exists(&repo, &used.pack).await);
        assert!(repo.store().list(CONDEMNED_DIR).await.unwrap().is_empty(), "nothing condemned");
    }

    /// A point of three directories of `files` files each (of `seed`'s noise),
    /// through a writer on `host` (which feeds its tree cache).
    async fn nested_point(repo: &Repository, host: &std::path::Path, seed: u64, files: u64) -> PointRef {
        let w = Writer::on_host(repo.clone(), timing(), Some(host.into())).await.unwrap();
        let w2 = w.clone();
        let root = tokio::task::spawn_blocking(move || {
            let mut p = w2.packer();
            let mut dirs = Vec::new();
            for d in 0..3 {
                let mut entries = Vec::new();
                for f in 0..files {
                    let data = crate::chunker::tests::noise(3000, seed * 100 + d * 10 + f);
                    let mut file = Entry::new(format!("f{f}").into_bytes(), EntryKind::File);
                    file.size = data.len() as u64;
                    file.content = vec![Extent::Data(p.store(BlobKind::Data, &data).unwrap())];
                    entries.push(file);
                }
                let mut dir = Entry::new(format!("d{d}").into_bytes(), EntryKind::Dir);
                dir.subtree = Some(p.store_tree(&Tree { entries }).unwrap());
                dirs.push(dir);
            }
            let root = p.store_tree(&Tree { entries: dirs }).unwrap();
            p.flush().unwrap();
            root
        })
        .await
        .unwrap();
        commit_root(&w, root).await
    }

    /// What the survey finds: every use, and what of each pack.
    /// Records name packs by number, sort by pack then offset, and a record read
    /// back with a number never given is an error, not some other pack.
    #[test]
    fn use_records_number_packs_and_refuse_an_unknown_number() {
        let mut numbers = PackNumbers::default();
        let (a, b) = (Id([9; 32]), Id([1; 32]));
        let mut records = vec![numbers.record(&a, 70, 5), numbers.record(&b, 3, 8), numbers.record(&a, 8, 2)];
        assert_eq!((numbers.number(&a), numbers.number(&b), numbers.number_of(&Id([2; 32]))), (0, 1, None));
        crate::spill::sort_unique(&mut records);
        let parsed: Vec<_> = records.iter().map(|r| numbers.parse(r).unwrap()).collect();
        assert_eq!(parsed, vec![(a, (8, 2)), (a, (70, 5)), (b, (3, 8))]);
        let err = numbers.parse(&use_of(2, 0, 1)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    /// The blobs the points use, by pack id (packs are numbered as the survey
    /// meets them, which differs between runs), and the trees read from the cache.
    async fn surveyed_with(repo: &Repository, cache: Option<&std::path::Path>) -> (Vec<(Id, (u32, u32))>, u64) {
        let mut report = PruneReport::default();
        let s = survey(repo, MAX_MEMORY, cache, &mut report, &|_| {}).await.unwrap();
        let mut uses: Vec<_> = s.uses.iter().map(|r| s.numbers.parse(&r.unwrap()).unwrap()).collect();
        uses.sort_unstable();
        (uses, report.cached_trees)
    }

    /// A host's tree cache, fed by the writers that store the trees and then by
    /// each run, surveys exactly as reading every tree from the store does: warm,
    /// after a forget, and damaged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tree_cache_surveys_as_the_store_does() {
        let repo = repo().await;
        let host = tempfile::tempdir().unwrap();
        let mut points = Vec::new();
        for seed in 1..=4 {
            // Each point shares a directory with the one before.
            points.push(nested_point(&repo, host.path(), seed, 2 + seed % 2).await);
        }
        let (cold, _) = surveyed_with(&repo, None).await;
        assert!(cold.len() > 4 * 3 * 2, "{} uses", cold.len());
        // Fed by the writers: every tree (4 roots, 12 directories) from the cache.
        let (warm, hits) = surveyed_with(&repo, Some(host.path())).await;
        assert_eq!(warm, cold);
        assert_eq!(hits, 16);
        // From the file the run wrote, which took the place of the writers'.
        let dir = host.path().join(format!("trees-{}", repo.id().to_hex()));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert_eq!(surveyed_with(&repo, Some(host.path())).await, (cold, 16));
        // A point forgotten: its trees are not reached, and go from the cache.
        forget(&repo, &points[0]).await;
        let (cold, _) = surveyed_with(&repo, None).await;
        assert_eq!(surveyed_with(&repo, Some(host.path())).await, (cold.clone(), 12));
        // Damaged: what does not open is read from the store again.
        let file = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
        let mut bytes = std::fs::read(&file).unwrap();
        for at in (40..bytes.len()).step_by(997) {
            bytes[at] ^= 0x40;
        }
        std::fs::write(&file, &bytes).unwrap();
        let (damaged, hits) = surveyed_with(&repo, Some(host.path())).await;
        assert_eq!(damaged, cold);
        assert!(hits < 12, "{hits} records read from a damaged file");
        assert_eq!(surveyed_with(&repo, Some(host.path())).await, (cold, 12), "mended by the run");
    }

    /// A survey past its memory goes to disk, and the run does as it would in
    /// memory: the same packs repacked and condemned, the point reading the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_survey_past_its_memory_spills_and_the_run_does_the_same() {
        let mut outcomes = Vec::new();
        for max_memory in [4 * USE_LEN as u64, MAX_MEMORY] {
            let repo = repo().await;
            let first = new_point(&repo, (1..=6).map(noise).collect()).await;
            let kept = new_point(&repo, vec![noise(1), noise(2), noise(7)]).await;
            forget(&repo, &first).await;
            tokio::time::sleep(GRACE).await;
            let opts = PruneOptions {
                dry_run: false,
                timing: timing(),
                wal_positions: None,
                max_unused: MaxUnused::default(),
                max_memory,
            };
            let r = prune(&repo, opts, &|_| {}).await.unwrap();
            assert_eq!(r.spilled_bytes > 0, max_memory < MAX_MEMORY, "{r:?}");
            assert_eq!(read_point(&repo, &kept).await.0, vec![noise(1), noise(2), noise(7)]);
            verified(&repo).await;
            outcomes.push((r.live_packs, r.repack.packs, r.repack.rewritten_points, r.condemned_packs));
        }
        assert_eq!(outcomes[0], outcomes[1]);
        assert!(outcomes[0].1 > 0, "a pack was repacked: {outcomes:?}");
    }

    /// A pack holding only the trees a repack writes again is used by nothing once
    /// the points are replaced: the same run condemns it, so the next one leaves
    /// nothing to do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pack_of_trees_written_again_is_condemned_by_the_repacking_run() {
        let repo = repo().await;
        let first = new_point(&repo, vec![noise(1), noise(2)]).await;
        let (_, data_packs) = read_point(&repo, &first).await;
        // The first file is deduplicated: this point's new pack holds its tree only.
        let kept = new_point(&repo, vec![noise(1)]).await;
        let root = repo.manifest(&kept).await.unwrap().root_ref().unwrap();
        assert!(!data_packs.contains(&root.pack), "the tree is in a pack of its own");
        forget(&repo, &first).await;
        tokio::time::sleep(GRACE).await;

        let repacked = run(&repo).await;
        assert_eq!((repacked.repack.packs, repacked.repack.rewritten_points), (1, 1), "{repacked:?}");
        assert_eq!(repacked.condemned_packs, 2, "the half-used pack and the pack of the old tree: {repacked:?}");
        tokio::time::sleep(GRACE).await;
        let swept = run(&repo).await;
        assert_eq!((swept.deleted_packs, swept.condemned_packs), (2, 0), "{swept:?}");
        assert!(!exists(&repo, &root.pack).await);
        assert_eq!(read_point(&repo, &kept).await.0, vec![noise(1)]);
        verified(&repo).await;
    }
}
