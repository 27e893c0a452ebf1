//! The walk: one thread goes through the point's tree depth first, with the trees
//! of the next directories fetched ahead, makes directories, symlinks and special
//! files, and hands files to the fetch stage through a bounded queue. Restoring
//! over an existing tree, it removes what the point does not have.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ctx::{in_link_group, link_step, make_link, Ctx, DirState, LinkStep, Waiting};
use super::error::RestoreError;
use super::trees::Trees;
use super::write::FileJob;
use super::{meta, target};
use crate::pack::BlobRef;
use crate::tree::{Entry, EntryKind, Tree};

/// Directory trees fetched ahead of the walk, per directory being walked.
const TREES_AHEAD: usize = 8;

pub(super) struct Walker {
    pub ctx: Arc<Ctx>,
    pub handle: Handle,
    pub trees: Arc<Trees>,
    pub files: mpsc::Sender<FileJob>,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError {
    let path = path.to_path_buf();
    move |cause| RestoreError::Io { op, path, cause }
}

impl Walker {
    fn fetch_tree(&self, blob: Option<BlobRef>) -> JoinHandle<Result<Tree, String>> {
        let planned = self.trees.plan(vec![blob]).pop().expect("one tree planned");
        self.trees.fetch(planned)
    }

    /// Walks the point's `top` entry into `target`: the backed-up directory itself
    /// becomes the target, or one entry of it lands in the target.
    pub fn run(&self, top: Entry, whole: bool, target: &Path) -> Result<(), RestoreError> {
        if whole && top.kind == EntryKind::Dir {
            // Like every directory restored: owner-writable, and without a setgid
            // bit that would give new files its group, until its own mode comes.
            fs::set_permissions(target, fs::Permissions::from_mode(0o700)).map_err(io("chmod", target))?;
            let root = DirState::new(target.to_path_buf(), Some(strip(&top)), None);
            let tree = self.handle.block_on(self.fetch_tree(top.subtree)).expect("tree fetch panicked");
            self.listed(tree, &root)?;
            root.done(&self.ctx);
        } else {
            let root = DirState::new(target.to_path_buf(), None, None);
            let name = OsStr::from_bytes(&top.name);
            if self.ctx.overwrite {
                // Only the path restored is made as the point has it.
                self.clear_for(&top, &target.join(name))?;
            }
            self.entry(&top, target.join(name), &root, None)?;
            root.done(&self.ctx);
        }
        Ok(())
    }

    /// Walks the entries of a directory whose tree was fetched (or not).
    fn listed(&self, tree: Result<Tree, String>, dir: &Arc<DirState>) -> Result<(), RestoreError> {
        let tree = match tree {
            Ok(t) => t,
            Err(e) => {
                self.ctx.entry_failed(dir.path(), format!("directory listing: {e}"));
                return Ok(());
            }
        };
        if self.ctx.overwrite {
            self.remove_extras(&tree, dir.path())?;
        }
        let mut ahead: VecDeque<JoinHandle<_>> = VecDeque::new();
        let subdirs = tree.entries.iter().filter(|e| e.kind == EntryKind::Dir).map(|e| e.subtree);
        let mut subdirs = self.trees.plan(subdirs.collect()).into_iter();
        for child in &tree.entries {
            if self.ctx.stopped() {
                break;
            }
            let mut fetched = None;
            if child.kind == EntryKind::Dir {
                while ahead.len() < TREES_AHEAD {
                    let Some(next) = subdirs.next() else { break };
                    ahead.push_back(self.trees.fetch(next));
                }
                let next = ahead.pop_front().expect("the tree of this directory was asked for");
                fetched = Some(next);
            }
            let path = dir.path().join(OsStr::from_bytes(&child.name));
            self.entry(child, path, dir, fetched)?;
        }
        for left in ahead {
            left.abort();
        }
        Ok(())
    }

    /// Restores one entry. Only problems with the target as a whole are errors; an
    /// entry that fails is reported and skipped.
    fn entry(
        &self,
        e: &Entry,
        path: PathBuf,
        parent: &Arc<DirState>,
        tree: Option<JoinHandle<Result<Tree, String>>>,
    ) -> Result<(), RestoreError> {
        let ctx = &self.ctx;
        let existing = if ctx.overwrite { fs::symlink_metadata(&path).ok() } else { None };
        match e.kind {
            EntryKind::Dir => {
                match &existing {
                    Some(m) if m.is_dir() => {}
                    Some(m) => {
                        self.replace(&path, m)?;
                        fs::create_dir(&path).map_err(io("create directory", &path))?;
                    }
                    None => fs::create_dir(&path).map_err(io("create directory", &path))?,
                }
                // Owner-writable while children are created; the real mode comes after.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).map_err(io("chmod", &path))?;
                let dir = DirState::new(path, Some(strip(e)), Some(parent.clone()));
                let tree = tree.unwrap_or_else(|| self.fetch_tree(e.subtree));
                let tree = self.handle.block_on(tree).expect("tree fetch panicked");
                self.listed(tree, &dir)?;
                dir.done(ctx);
            }
            EntryKind::File => {
                let grown = ctx.overlay.applied(e);
                let e = grown.into_owned();
                if in_link_group(&e) {
                    let w = Waiting { path, entry: e, parent: parent.clone() };
                    match link_step(&ctx.links, w.entry.link_group, w) {
                        (LinkStep::Restore, Some(w)) => self.file(w.entry, w.path, parent, existing.as_ref())?,
                        (LinkStep::LinkTo(first), Some(w)) => make_link(ctx, &first, &w.path, &w.entry),
                        _ => {}
                    }
                } else {
                    self.file(e, path, parent, existing.as_ref())?;
                }
            }
            EntryKind::Symlink => {
                if let Some(m) = &existing {
                    self.replace(&path, m)?;
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.target), &path).map_err(io("create symlink", &path))?;
                self.made(&path, e);
            }
            EntryKind::Fifo | EntryKind::Socket | EntryKind::CharDevice | EntryKind::BlockDevice => {
                if let Some(m) = &existing {
                    self.replace(&path, m)?;
                }
                let kind = match e.kind {
                    EntryKind::Fifo => libc::S_IFIFO,
                    EntryKind::Socket => libc::S_IFSOCK,
                    EntryKind::CharDevice => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                let c = meta::cpath(&path);
                // SAFETY: `c` is a valid NUL-terminated path; mknod only reads it.
                let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, e.rdev as libc::dev_t) };
                if rc != 0 {
                    let err = std::io::Error::last_os_error();
                    ctx.warn(vec![format!("{}: could not recreate special file: {err}", path.display())]);
                    return Ok(());
                }
                self.made(&path, e);
            }
        }
        Ok(())
    }

    /// A symlink or special file was made: its metadata now.
    fn made(&self, path: &Path, e: &Entry) {
        let mut warnings = Vec::new();
        meta::apply(path, e, &mut warnings);
        self.ctx.warn(warnings);
        self.ctx.count_other();
    }

    /// Hands a file to the fetch stage.
    fn file(
        &self,
        e: Entry,
        path: PathBuf,
        parent: &Arc<DirState>,
        existing: Option<&fs::Metadata>,
    ) -> Result<(), RestoreError> {
        let mut check_existing = false;
        if let Some(m) = existing {
            if target::same_size_and_time(m, &e) {
                check_existing = true;
            } else if m.is_dir() {
                self.replace(&path, m)?;
            }
        }
        parent.add_child();
        let job = FileJob { path, entry: e, parent: parent.clone(), check_existing };
        if self.files.blocking_send(job).is_err() {
            // The fetch stage stopped (the target is full): so does the walk.
            parent.done(&self.ctx);
        }
        Ok(())
    }

    /// Removes what is at `path`, to put an entry of another kind there.
    fn replace(&self, path: &Path, m: &fs::Metadata) -> Result<(), RestoreError> {
        target::remove(path, m).map_err(io("remove", path))?;
        self.ctx.count_removed();
        Ok(())
    }

    /// Removes what is at the path an entry restored alone goes to, unless it can
    /// stay (a directory, or a file that may be unchanged).
    fn clear_for(&self, e: &Entry, path: &Path) -> Result<(), RestoreError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() && e.kind == EntryKind::Dir => Ok(()),
            Ok(m) if m.is_file() && e.kind == EntryKind::File => Ok(()),
            Ok(m) => self.replace(path, &m),
            Err(_) => Ok(()),
        }
    }

    /// Removes the entries of an existing directory that the point does not have
    /// (temporary files of an interrupted restore among them).
    fn remove_extras(&self, tree: &Tree, dir: &Path) -> Result<(), RestoreError> {
        let Ok(listing) = fs::read_dir(dir) else { return Ok(()) };
        for item in listing {
            let item = item.map_err(io("read directory", dir))?;
            let name = item.file_name();
            if tree.find(name.as_bytes()).is_some() {
                continue;
            }
            let path = item.path();
            let removed = fs::symlink_metadata(&path).and_then(|m| target::remove(&path, &m));
            match removed {
                Ok(()) => self.ctx.count_removed(),
                Err(err) => self.ctx.entry_failed(&path, format!("not in the point, and could not be removed: {err}")),
            }
        }
        Ok(())
    }
}

/// A directory entry's metadata, without what the walk no longer needs.
fn strip(e: &Entry) -> Entry {
    Entry { content: Vec::new(), subtree: None, ..e.clone() }
}
