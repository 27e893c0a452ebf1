//! `ebb verify`: checks that every point can be read back. Without `read_data` it
//! decrypts every manifest, index file and tree and checks that every data blob they
//! reference lies inside an existing pack; with it, it also downloads every pack and
//! authenticates every blob in it. Fragments are checked like points. Every problem names the object it was found in.

use std::collections::{HashMap, HashSet};

use futures::stream::{self, StreamExt};

use crate::error::RepoError;
use crate::fragment::{FragmentRef, FRAGS_DIR};
use crate::index::{open_index, INDEX_DIR};
use crate::pack::{parse_pack_name, read_header, BlobKind, BlobRef, PACKS_DIR};
use crate::repo::Repository;
use crate::tree::{EntryKind, Extent};
use crate::Id;

const CONCURRENT_PACKS: usize = 4;

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub points: u64,
    pub trees: u64,
    pub data_blobs: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub index_files: u64,
    pub fragments: u64,
    /// Packs no point or fragment references, left by interrupted backups (not
    /// those of a point found missing, which are errors).
    pub unreferenced_packs: u64,
    /// Packs that only points found missing referenced.
    pub packs_of_missing_points: u64,
    /// Points `ebb forget` removed whose index files are still there; what only
    /// they referenced waits for `ebb prune`.
    pub forgotten_points: u64,
    pub errors: Vec<String>,
}

pub async fn verify(
    repo: &Repository,
    read_data: bool,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<VerifyReport, RepoError> {
    let mut report = VerifyReport::default();
    let store = repo.store();

    let (_, slot_problems) = repo.key_slots().await?;
    report.errors.extend(slot_problems);

    // Index files are listed before points: each is written after its point's
    // manifest, so a point an index file names exists by the time points are listed.
    progress("index files");
    let mut indexed: Vec<(String, String, HashSet<Id>)> = Vec::new();
    for obj in store.list(INDEX_DIR).await? {
        report.index_files += 1;
        match store.get(&obj.name).await {
            Ok(bytes) => match open_index(repo.keys(), &obj.name, &bytes) {
                Ok(file) => {
                    let packs: HashSet<Id> = file.entries.iter().map(|e| e.blob.pack).collect();
                    for point in file.points {
                        indexed.push((obj.name.clone(), point, packs.clone()));
                    }
                }
                Err(e) => report.errors.push(e.to_string()),
            },
            Err(e) => report.errors.push(e.to_string()),
        }
    }

    progress("packs");
    let mut pack_sizes: HashMap<Id, u64> = HashMap::new();
    for obj in store.list(PACKS_DIR).await? {
        match parse_pack_name(&obj.name) {
            Some(id) => {
                pack_sizes.insert(id, obj.size);
            }
            None => report.errors.push(format!("{}: not a pack name", obj.name)),
        }
    }
    report.packs = pack_sizes.len() as u64;

    // Walk every point's trees once; remember every blob they reference.
    let mut seen_trees: HashSet<Id> = HashSet::new();
    let mut refs: HashMap<Id, HashSet<(BlobKind, BlobRef)>> = HashMap::new();
    let in_pack = |b: &BlobRef| pack_sizes.get(&b.pack).is_some_and(|&size| b.range().end <= size);
    let mut points_seen: HashSet<String> = HashSet::new();
    for source in repo.sources().await? {
        for point in repo.points(&source).await? {
            points_seen.insert(point.name.clone());
            progress(&format!("point {}", point.name));
            report.points += 1;
            let manifest = match repo.manifest(&point).await {
                Ok(m) => m,
                Err(e) => {
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            let mut stack = vec![manifest.root_ref().expect("checked when opened")];
            while let Some(tree_ref) = stack.pop() {
                if !seen_trees.insert(tree_ref.id) {
                    continue;
                }
                report.trees += 1;
                if !in_pack(&tree_ref) {
                    report.errors.push(missing(BlobKind::Tree, &tree_ref, &point.name));
                    continue;
                }
                refs.entry(tree_ref.pack).or_default().insert((BlobKind::Tree, tree_ref));
                let tree = match repo.read_tree(&tree_ref).await {
                    Ok(t) => t,
                    Err(e) => {
                        report.errors.push(format!("{e} (in point {})", point.name));
                        continue;
                    }
                };
                for entry in &tree.entries {
                    match entry.kind {
                        EntryKind::Dir => stack.extend(entry.subtree),
                        EntryKind::File => {
                            for ext in &entry.content {
                                if let Extent::Data(b) = ext {
                                    if !in_pack(b) {
                                        report.errors.push(missing(BlobKind::Data, b, &point.name));
                                    } else if refs.entry(b.pack).or_default().insert((BlobKind::Data, *b)) {
                                        report.data_blobs += 1;
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    for source in store.list_dirs(FRAGS_DIR).await? {
        let mut names: Vec<String> =
            store.list(&format!("{FRAGS_DIR}/{source}")).await?.into_iter().map(|o| o.name).collect();
        names.sort();
        progress(&format!("fragments of {source}"));
        for name in names {
            report.fragments += 1;
            let Some(f) = FragmentRef::parse(&name) else {
                report.errors.push(format!("{name}: not a fragment name"));
                continue;
            };
            match repo.fragment(&f).await {
                Ok(frag) => {
                    for b in frag.growths.iter().flat_map(|g| &g.chunks) {
                        if !in_pack(b) {
                            report.errors.push(missing(BlobKind::Data, b, &name));
                        } else if refs.entry(b.pack).or_default().insert((BlobKind::Data, *b)) {
                            report.data_blobs += 1;
                        }
                    }
                }
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    // A point whose index file is there but whose manifest is not was forgotten,
    // or deleted or lost: what it held is no longer restorable.
    let (forgotten, record_problems) = crate::forget::forgotten_points(repo).await?;
    report.errors.extend(record_problems);
    let mut of_missing_points: HashSet<Id> = HashSet::new();
    for (index, point, packs) in &indexed {
        if points_seen.contains(point) {
            continue;
        }
        if forgotten.contains(point) {
            report.forgotten_points += 1;
        } else {
            report.errors.push(format!(
                "point {point} is missing: its manifest was deleted or lost (index file {index} was written with it)"
            ));
            of_missing_points.extend(packs.iter().filter(|p| !refs.contains_key(p)));
        }
    }
    // Packs of unreadable points would look unreferenced: only count when every point was read.
    if report.errors.is_empty() {
        report.unreferenced_packs = pack_sizes.keys().filter(|p| !refs.contains_key(p)).count() as u64;
    }
    report.packs_of_missing_points = of_missing_points.len() as u64;

    if read_data {
        let mut packs: Vec<Id> = pack_sizes.keys().copied().collect();
        packs.sort();
        let total = packs.len();
        let mut checks = stream::iter(packs.into_iter().map(|pack| {
            let wanted = refs.get(&pack);
            async move { check_pack(repo, pack, wanted).await }
        }))
        .buffer_unordered(CONCURRENT_PACKS);
        let mut done = 0;
        while let Some(errors) = checks.next().await {
            done += 1;
            progress(&format!("read packs {done}/{total}"));
            report.errors.extend(errors);
        }
        report.packs_read = done as u64;
    }
    Ok(report)
}

/// A blob that `object` (a point or a fragment) references is not where it says.
fn missing(kind: BlobKind, b: &BlobRef, object: &str) -> String {
    let kind = if kind == BlobKind::Tree { "tree" } else { "data" };
    format!(
        "{kind} blob {} of {object} should be at bytes {}..{} of {}, which is missing or shorter \
         (`ebb repair index` makes new backups store its content again)",
        b.id.short(),
        b.offset,
        b.range().end,
        crate::pack_name(&b.pack)
    )
}

/// Downloads one pack and authenticates its header and every blob in it.
async fn check_pack(repo: &Repository, pack: Id, wanted: Option<&HashSet<(BlobKind, BlobRef)>>) -> Vec<String> {
    let name = crate::pack_name(&pack);
    let bytes = match repo.store().get(&name).await {
        Ok(b) => b,
        Err(e) => return vec![e.to_string()],
    };
    let repo = repo.clone();
    let wanted: Vec<(BlobKind, BlobRef)> = wanted.map(|w| w.iter().copied().collect()).unwrap_or_default();
    tokio::task::spawn_blocking(move || {
        let mut errors = Vec::new();
        let mut checked = HashSet::new();
        match read_header(repo.keys(), &pack, &bytes) {
            Ok(entries) => {
                for e in entries {
                    let sealed = &bytes[e.blob.range().start as usize..e.blob.range().end as usize];
                    if let Err(err) = repo.open_blob(e.kind, &e.blob, sealed) {
                        errors.push(err.to_string());
                    }
                    checked.insert((e.kind, e.blob));
                }
            }
            Err(e) => errors.push(format!("{name}: {e}")),
        }
        // Whatever the header says, every blob a tree points at must open where it points.
        for (kind, b) in wanted {
            if checked.contains(&(kind, b)) {
                continue;
            }
            let r = b.range();
            match bytes.get(r.start as usize..r.end as usize) {
                Some(sealed) => {
                    if let Err(err) = repo.open_blob(kind, &b, sealed) {
                        errors.push(err.to_string());
                    }
                }
                None => errors.push(format!("{name}: blob {} lies beyond the end", b.id.short())),
            }
        }
        errors.dedup();
        errors
    })
    .await
    .expect("pack check panicked")
}
