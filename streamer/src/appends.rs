//! Appends to files, shipped as fragments between points.
//!
//! `Tails` remembers, for each file being appended to (by device and inode), how
//! far the repository has it and the content id of its last chunk. A fragment
//! extends a file from exactly there, after checking that the last chunk still
//! reads the same: a file that shrank, or whose last chunk changed (rewritten in
//! place), is not an append, and waits for the next point. So does a file the
//! newest point does not have.
//!
//! A walk and a fragment never read the same file at once: each claims the file
//! first. A walk stores a file at least up to where the fragments have it, and
//! the fragments after it continue from where the walk stored it, so they continue
//! the point exactly, on a chunk boundary (see `catalog::Overlay`); fragments from
//! before the walk end within what it stored.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use catalog::chunker::{ChunkError, Chunker};
use catalog::tree::{Entry, EntryKind, Extent, Timestamp as TreeTime, Tree};
use catalog::{Fragment, FragmentBuilder, Growth, Id, Repository};

/// A file's identity: device and inode.
pub type Ident = (u64, u64);

/// How far the repository has a file, and the chunk that ends there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    pub size: u64,
    /// Where the last chunk starts, and its content id. `None` for an empty file.
    pub last: Option<(u64, Id)>,
}

impl Tail {
    /// The tail of stored content; `None` if it ends in a hole, which appends cannot
    /// continue.
    pub fn of(content: &[Extent]) -> Option<Tail> {
        let size = content.iter().map(Extent::len).sum();
        match content.last() {
            None => Some(Tail { size: 0, last: None }),
            Some(Extent::Data(b)) => Some(Tail { size, last: Some((size - b.raw_len as u64, b.id)) }),
            Some(Extent::Hole(_)) => None,
        }
    }
}

#[derive(Default)]
struct Slot {
    tail: Option<Tail>,
    busy: bool,
}

/// The tails of the files being appended to, shared by the walk and the fragments.
#[derive(Default)]
pub struct Tails {
    slots: Mutex<HashMap<Ident, Slot>>,
    freed: Condvar,
}

impl std::fmt::Debug for Tails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tails({} files)", self.slots.lock().map(|s| s.len()).unwrap_or(0))
    }
}

/// Tails kept at most; beyond it the idle ones are forgotten (a forgotten file is
/// looked up in the newest point again).
const MAX_TAILS: usize = 100_000;

impl Tails {
    /// Claims a file, waiting while someone else has it; returns its tail if known.
    pub fn claim(&self, id: Ident) -> Option<Tail> {
        let mut slots = self.slots.lock().expect("tails lock");
        while slots.get(&id).is_some_and(|s| s.busy) {
            slots = self.freed.wait(slots).expect("tails lock");
        }
        let slot = slots.entry(id).or_default();
        slot.busy = true;
        slot.tail
    }

    /// Claims a file unless someone else has it: `Err` when busy.
    fn try_claim(&self, id: Ident) -> Result<Option<Tail>, ()> {
        let mut slots = self.slots.lock().expect("tails lock");
        let slot = slots.entry(id).or_default();
        if slot.busy {
            return Err(());
        }
        slot.busy = true;
        Ok(slot.tail)
    }

    /// Gives a claimed file back with what the repository now has of it.
    pub fn release(&self, id: Ident, tail: Option<Tail>) {
        let mut slots = self.slots.lock().expect("tails lock");
        match tail {
            Some(t) => {
                slots.insert(id, Slot { tail: Some(t), busy: false });
            }
            None => {
                slots.remove(&id);
            }
        }
        if slots.len() > MAX_TAILS {
            slots.retain(|_, s| s.busy);
        }
        drop(slots);
        self.freed.notify_all();
    }
}

/// The newest point as the last walk left it: its top entry and every tree.
pub struct LastWalk {
    pub top: Entry,
    pub trees: Arc<HashMap<Id, Arc<Tree>>>,
}

impl LastWalk {
    /// The entry at `rel` (relative to the top), if the trees at hand have it.
    fn lookup(&self, rel: &Path) -> Option<Entry> {
        let mut entry = self.top.clone();
        for comp in rel.components() {
            let name = comp.as_os_str().as_encoded_bytes();
            let tree = self.trees.get(&entry.subtree?.id)?;
            entry = tree.find(name)?.clone();
        }
        Some(entry)
    }
}

/// What one round of fragment shipping found and prepared.
pub struct Round {
    pub builder: FragmentBuilder,
    pub fragment: Fragment,
    /// The claimed files: their tail before and after this fragment.
    pub claims: Vec<(Ident, Option<Tail>, Tail)>,
    /// Changed in ways only a point can hold.
    pub needs_point: Vec<PathBuf>,
    /// Being read by a walk: try again next round.
    pub busy: Vec<PathBuf>,
    /// Appended bytes read.
    pub bytes: u64,
}

impl Round {
    /// Gives every claimed file back: with its new tail once the fragment is
    /// durable, else as it was.
    pub fn release(&self, tails: &Tails, shipped: bool) {
        for (id, before, after) in &self.claims {
            tails.release(*id, if shipped { Some(*after) } else { *before });
        }
    }
}

/// Reads what was appended to `paths` since the repository last had them, and
/// prepares a fragment of it. Blocks.
pub fn prepare(repo: &Repository, root: &Path, last_walk: &LastWalk, tails: &Tails, paths: Vec<PathBuf>) -> Round {
    let mut round = Round {
        builder: FragmentBuilder::new(repo),
        fragment: Fragment::default(),
        claims: Vec::new(),
        needs_point: Vec::new(),
        busy: Vec::new(),
        bytes: 0,
    };
    let mut chunker = Chunker::new(repo.keys().chunker_seed);
    for path in paths {
        let Ok(f) = crate::metadata::open_file(&path) else {
            round.needs_point.push(path);
            continue;
        };
        let Ok(meta) = f.metadata() else {
            round.needs_point.push(path);
            continue;
        };
        if !meta.is_file() {
            round.needs_point.push(path);
            continue;
        }
        let id = (meta.dev(), meta.ino());
        let Ok(claimed) = tails.try_claim(id) else {
            round.busy.push(path);
            continue;
        };
        let base = claimed.or_else(|| {
            let e = last_walk.lookup(path.strip_prefix(root).ok()?)?;
            (e.kind == EntryKind::File && (e.device, e.inode) == id).then(|| Tail::of(&e.content)).flatten()
        });
        let mtime = TreeTime { sec: meta.mtime(), nsec: meta.mtime_nsec() as u32 };
        match base.map(|b| append(repo, &mut chunker, &mut round.builder, &f, b, meta.len())) {
            Some(Ok(Some((growth_from, chunks, after)))) => {
                round.bytes += after.size - growth_from;
                round.fragment.growths.push(Growth { device: id.0, inode: id.1, from: growth_from, mtime, chunks });
                round.claims.push((id, claimed, after));
            }
            // Nothing new.
            Some(Ok(None)) => tails.release(id, base),
            Some(Err(why)) => {
                tracing::debug!("{}: {why}; it waits for the next point", path.display());
                tails.release(id, None);
                round.needs_point.push(path);
            }
            None => {
                tails.release(id, None);
                round.needs_point.push(path);
            }
        }
    }
    round
}

/// The chunks appended to `f` after `base`, and its new tail; `None` if nothing was.
#[allow(clippy::type_complexity)]
fn append(
    repo: &Repository,
    chunker: &mut Chunker,
    builder: &mut FragmentBuilder,
    mut f: &File,
    base: Tail,
    size: u64,
) -> Result<Option<(u64, Vec<catalog::BlobRef>, Tail)>, &'static str> {
    if size == base.size {
        return Ok(None);
    }
    if size < base.size {
        return Err("it shrank");
    }
    if let Some((start, id)) = base.last {
        let mut last = vec![0; (base.size - start) as usize];
        f.seek(SeekFrom::Start(start)).and_then(|_| f.read_exact(&mut last)).map_err(|_| "it shrank")?;
        if repo.keys().content_id(&last) != id {
            return Err("its stored end changed: rewritten, not appended to");
        }
    } else if base.size > 0 {
        return Err("it ends in a hole");
    }
    f.seek(SeekFrom::Start(base.size)).map_err(|_| "it cannot be read")?;
    let mut chunks = Vec::new();
    let mut at = base.size;
    let mut last = None;
    let read = chunker
        .run(f.take(size - base.size), |chunk| {
            let b = builder.store(chunk);
            last = Some((at, b.id));
            at += chunk.len() as u64;
            chunks.push(b);
            Ok::<(), ()>(())
        })
        .map_err(|e| match e {
            ChunkError::Read(_) | ChunkError::Emit(()) => "it cannot be read",
        })?;
    if read != size - base.size {
        return Err("it shrank");
    }
    Ok(Some((base.size, chunks, Tail { size, last })))
}
