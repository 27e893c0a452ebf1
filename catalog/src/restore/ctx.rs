//! What the stages of one restore share: its settings, report and counters, the
//! directories waiting for their children, and the names of a link group
//! waiting for the first.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::error::{FileFailure, RestoreError};
use super::options::RestoreOptions;
use super::report::{Progress, RestoreReport};
use super::{meta, target};
use crate::cache::ChunkCache;
use crate::fragment::Overlay;
use crate::repo::Repository;
use crate::tree::{Entry, EntryKind};

/// What the stages of one restore share.
pub(super) struct Ctx {
    pub repo: Repository,
    pub overlay: Overlay,
    pub overwrite: bool,
    /// `RestoreOptions::write_back`.
    pub write_back: bool,
    pub memory: usize,
    /// The user and group files are created with, when no directory they go to
    /// has a setgid bit while the restore runs (see `meta::apply_to_file`).
    pub made_as: Option<(u32, u32)>,
    pub cache: ChunkCache,
    pub temp: target::TempNames,
    pub links: Links,
    /// Files and directories with inode flags, set once all else is done.
    flagged: Mutex<Vec<(PathBuf, u32)>>,
    report: Mutex<RestoreReport>,
    progress: Arc<Progress>,
    /// Why the restore stopped early: the first error that ends it.
    stopped: AtomicBool,
    fatal: Mutex<Option<RestoreError>>,
}

impl Ctx {
    /// The settings of `opts`; `made_as`: see the field.
    pub fn new(repo: Repository, opts: &RestoreOptions, made_as: Option<(u32, u32)>) -> Ctx {
        let memory = opts.memory.max(1 << 20);
        Ctx {
            repo,
            overlay: opts.overlay.clone(),
            overwrite: opts.overwrite,
            write_back: opts.write_back,
            memory,
            made_as,
            cache: ChunkCache::new(memory / 8),
            temp: target::TempNames::new(),
            links: Mutex::new(HashMap::new()),
            flagged: Mutex::new(Vec::new()),
            report: Mutex::new(RestoreReport::default()),
            progress: opts.progress.clone(),
            stopped: AtomicBool::new(false),
            fatal: Mutex::new(None),
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Ends the restore early with `e`: nothing more is started.
    pub fn stop(&self, e: RestoreError) {
        self.fatal.lock().expect("fatal").get_or_insert(e);
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub fn report(&self) -> std::sync::MutexGuard<'_, RestoreReport> {
        self.report.lock().expect("restore report")
    }

    pub fn warn(&self, warnings: Vec<String>) {
        if !warnings.is_empty() {
            self.report().warnings.extend(warnings);
        }
    }

    pub fn flag(&self, path: &Path, e: &Entry) {
        if e.flags != 0 && matches!(e.kind, EntryKind::File | EntryKind::Dir) {
            self.flagged.lock().expect("flagged").push((path.to_path_buf(), e.flags));
        }
    }

    pub fn count_file(&self, bytes: u64) {
        let mut r = self.report();
        r.files += 1;
        r.bytes += bytes;
        self.progressed(bytes);
    }

    pub fn count_unchanged(&self, bytes: u64) {
        let mut r = self.report();
        r.unchanged += 1;
        r.unchanged_bytes += bytes;
        self.progressed(bytes);
    }

    pub fn count_link(&self) {
        self.report().files += 1;
        self.progressed(0);
    }

    /// One more file done, of `bytes`.
    fn progressed(&self, bytes: u64) {
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn count_dir(&self) {
        self.report().dirs += 1;
    }

    pub fn count_other(&self) {
        self.report().others += 1;
    }

    pub fn count_removed(&self) {
        self.report().removed += 1;
    }

    pub fn count_fetched(&self, bytes: u64) {
        self.report().fetched += bytes;
        self.progress.fetched.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn entry_failed(&self, path: &Path, why: String) {
        self.report().failed.push((path.to_path_buf(), why));
    }

    pub fn file_failed(&self, path: &Path, why: &FileFailure) {
        let mut r = self.report();
        if matches!(why, FileFailure::Repository(_)) {
            r.unreadable += 1;
        }
        r.failed.push((path.to_path_buf(), why.to_string()));
    }

    /// The first name of a link group is restored (or failed): the names waiting
    /// for it are linked to it (or fail the same way).
    pub fn linked(&self, e: &Entry, path: &Path, outcome: Result<(), FileFailure>) {
        if !in_link_group(e) {
            return;
        }
        let waiting = {
            let mut links = self.links.lock().expect("links");
            let now = match &outcome {
                Ok(()) => Some(Link::Done(path.to_path_buf())),
                // A later name tries again, as the first of the group.
                Err(_) => None,
            };
            let before = match now {
                Some(l) => links.insert(e.link_group, l),
                None => links.remove(&e.link_group),
            };
            match before {
                Some(Link::Pending(w)) => w,
                _ => Vec::new(),
            }
        };
        for w in waiting {
            match &outcome {
                Ok(()) => make_link(self, path, &w.path, &w.entry),
                Err(why) => self.file_failed(&w.path, why),
            }
            w.parent.done(self);
        }
    }

    /// After every stage: inode flags, then the report. What was written is in the
    /// page cache, as after `cp` or `restic restore`; PostgreSQL syncs a data
    /// directory itself when it starts recovery.
    pub fn finish(self) -> Result<RestoreReport, RestoreError> {
        if let Some(e) = self.fatal.into_inner().expect("fatal") {
            return Err(e);
        }
        let mut report = self.report.into_inner().expect("restore report");
        for (path, flags) in self.flagged.into_inner().expect("flagged") {
            if let Err(err) = meta::set_inode_flags(&path, flags) {
                report.warnings.push(format!("{}: inode flags {flags:#x}: {err}", path.display()));
            }
        }
        Ok(report)
    }
}

/// A directory being restored: its metadata waits until its children are done.
pub(super) struct DirState {
    path: PathBuf,
    /// None for the target directory when restoring one path of a point.
    entry: Option<Entry>,
    /// Children not done yet, plus one while the walk is still listing it.
    pending: AtomicUsize,
    parent: Option<Arc<DirState>>,
}

impl DirState {
    pub fn new(path: PathBuf, entry: Option<Entry>, parent: Option<Arc<DirState>>) -> Arc<DirState> {
        if let Some(p) = &parent {
            p.add_child();
        }
        Arc::new(DirState { path, entry, pending: AtomicUsize::new(1), parent })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One more child to wait for.
    pub fn add_child(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// A child is done (or the listing is): the last one applies the metadata.
    pub fn done(&self, ctx: &Ctx) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some(e) = &self.entry {
            let mut warnings = Vec::new();
            meta::apply(&self.path, e, &mut warnings);
            ctx.warn(warnings);
            ctx.flag(&self.path, e);
            ctx.count_dir();
        }
        if let Some(p) = &self.parent {
            p.done(ctx);
        }
    }
}

/// The names of one inode (a link group): the first is restored, the others are
/// hard links to it, made once it has its real name.
pub(super) enum Link {
    /// The first name is being restored; these names wait for it.
    Pending(Vec<Waiting>),
    Done(PathBuf),
}

pub(super) struct Waiting {
    pub path: PathBuf,
    pub entry: Entry,
    pub parent: Arc<DirState>,
}

pub(super) type Links = Mutex<HashMap<u64, Link>>;

/// What the walk does with a name of a link group.
pub(super) enum LinkStep {
    /// The first name: restore it.
    Restore,
    /// Waiting for the first name.
    Wait,
    /// Link to this path now.
    LinkTo(PathBuf),
}

/// Notes the name `w` of link group `group`.
pub(super) fn link_step(links: &Links, group: u64, w: Waiting) -> (LinkStep, Option<Waiting>) {
    let mut links = links.lock().expect("links");
    match links.get_mut(&group) {
        None => {
            links.insert(group, Link::Pending(Vec::new()));
            (LinkStep::Restore, Some(w))
        }
        Some(Link::Pending(waiting)) => {
            w.parent.add_child();
            waiting.push(w);
            (LinkStep::Wait, None)
        }
        Some(Link::Done(first)) => (LinkStep::LinkTo(first.clone()), Some(w)),
    }
}

/// Makes `path` a hard link to `first`; a copy, with a warning, where the target
/// cannot link. Replaces what is at `path` when restoring over a tree.
pub(super) fn make_link(ctx: &Ctx, first: &Path, path: &Path, e: &Entry) {
    if let Ok(m) = fs::symlink_metadata(path) {
        let same = fs::metadata(first).is_ok_and(|f| f.ino() == m.ino() && f.dev() == m.dev());
        if same {
            ctx.count_link();
            return;
        }
        if let Err(err) = target::remove(path, &m) {
            ctx.file_failed(path, &FileFailure::target(err));
            return;
        }
        ctx.count_removed();
    }
    match fs::hard_link(first, path) {
        Ok(()) => ctx.count_link(),
        Err(err) => {
            ctx.warn(vec![format!(
                "{}: could not hard-link to {}: {err}; restoring a copy",
                path.display(),
                first.display()
            )]);
            match fs::copy(first, path) {
                Ok(_) => {
                    let mut warnings = Vec::new();
                    meta::apply(path, e, &mut warnings);
                    ctx.warn(warnings);
                    ctx.count_link();
                }
                Err(err) => ctx.file_failed(path, &FileFailure::target(err)),
            }
        }
    }
}

/// Whether `e` is a file with several names.
pub(super) fn in_link_group(e: &Entry) -> bool {
    e.kind == EntryKind::File && e.link_group != 0
}
