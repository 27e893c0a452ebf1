//! Restore: writes a point's tree (or one path of it) to the local filesystem with its
//! metadata: holes stay holes, hard links stay links, and ownership, modes, times and
//! extended attributes are applied after content (directories after their children).
//! Inode flags (`chattr`) come last of all, once nothing more is written: an
//! immutable file could not be linked to, an immutable directory not filled.
//! A file whose data cannot be read is reported and removed, never left with wrong
//! bytes; the rest of the restore goes on.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt};
use tokio::runtime::Handle;

use crate::error::{BlobError, RepoError};
use crate::fragment::Overlay;
use crate::pack::BlobKind;
use crate::point::Manifest;
use crate::repo::Repository;
use crate::tree::{Entry, EntryKind, Extent, Timestamp};

/// Chunks fetched at once while restoring one file.
const FETCH_AHEAD: usize = 8;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore only this path of the point (relative to the backed-up directory); it
    /// lands as `target/<its name>`.
    pub path: Option<Vec<u8>>,
    pub target: PathBuf,
    /// The appends after the point, up to the moment restored (`Repository::overlay`).
    pub overlay: Overlay,
}

#[derive(Debug, Default)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    pub bytes: u64,
    /// Entries that could not be restored: (path, reason). Their files are not left behind.
    pub failed: Vec<(PathBuf, String)>,
    /// How many of those failed because the repository could not give their data
    /// (damaged or missing), rather than because of the target.
    pub unreadable: usize,
    /// Metadata that could not be applied (e.g. ownership when not root).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{path:?} does not exist in this point")]
    NoSuchPath { path: String },
    #[error("target {0} exists and is not an empty directory; restore into a new or empty directory")]
    TargetNotEmpty(PathBuf),
    #[error("{op} {}: {cause}", path.display())]
    Io { op: &'static str, path: PathBuf, cause: std::io::Error },
    #[error("the point's root tree is malformed: {0}")]
    BadRoot(String),
    #[error("the target's filesystem is full (writing {}: {cause}); free space there, or restore elsewhere", path.display())]
    TargetFull { path: PathBuf, cause: std::io::Error },
}

pub async fn restore(
    repo: &Repository,
    manifest: &Manifest,
    opts: RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let repo = repo.clone();
    let manifest = manifest.clone();
    let handle = Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut r = Restorer {
            repo,
            handle,
            overlay: opts.overlay.clone(),
            links: HashMap::new(),
            flagged: Vec::new(),
            report: RestoreReport::default(),
        };
        r.run(&manifest, &opts)?;
        r.apply_flags();
        Ok(r.report)
    })
    .await
    .expect("restore thread panicked")
}

struct Restorer {
    repo: Repository,
    handle: Handle,
    overlay: Overlay,
    /// link group -> the path restored first, which later names link to.
    links: HashMap<u64, PathBuf>,
    /// Files and directories with inode flags, set once all else is done.
    flagged: Vec<(PathBuf, u32)>,
    report: RestoreReport,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError {
    let path = path.to_path_buf();
    move |cause| RestoreError::Io { op, path, cause }
}

impl Restorer {
    fn tree(&self, entry: &Entry) -> Result<crate::tree::Tree, RepoError> {
        let blob = entry.subtree.as_ref().expect("a directory entry has a subtree");
        self.handle.block_on(self.repo.read_tree(blob))
    }

    fn run(&mut self, manifest: &Manifest, opts: &RestoreOptions) -> Result<(), RestoreError> {
        let root_ref = manifest.root_ref().ok_or_else(|| RestoreError::BadRoot("unreadable reference".into()))?;
        let root = self.handle.block_on(self.repo.read_tree(&root_ref))?;
        let [top] = root.entries.as_slice() else {
            return Err(RestoreError::BadRoot(format!("{} entries instead of one", root.entries.len())));
        };
        let mut entry = top.clone();
        if let Some(path) = &opts.path {
            for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".") {
                let missing = || RestoreError::NoSuchPath { path: String::from_utf8_lossy(path).into_owned() };
                if entry.kind != EntryKind::Dir || comp == b".." {
                    return Err(missing());
                }
                entry = self.tree(&entry)?.find(comp).cloned().ok_or_else(missing)?;
            }
        }
        prepare_target(&opts.target)?;
        if opts.path.is_none() && entry.kind == EntryKind::Dir {
            // The backed-up directory itself becomes the target.
            self.dir_contents(&entry, &opts.target)?;
            self.apply_meta(&opts.target, &entry);
            self.report.dirs += 1;
        } else {
            let dest = opts.target.join(OsStr::from_bytes(&entry.name));
            self.entry(&entry, &dest)?;
        }
        Ok(())
    }

    fn dir_contents(&mut self, dir: &Entry, path: &Path) -> Result<(), RestoreError> {
        let tree = match self.tree(dir) {
            Ok(t) => t,
            Err(e) => {
                self.report.failed.push((path.to_path_buf(), format!("directory listing: {e}")));
                return Ok(());
            }
        };
        for child in &tree.entries {
            self.entry(child, &path.join(OsStr::from_bytes(&child.name)))?;
        }
        Ok(())
    }

    /// Restores one entry. Only problems with the target as a whole are errors;
    /// an entry that fails is reported and skipped.
    fn entry(&mut self, e: &Entry, path: &Path) -> Result<(), RestoreError> {
        match e.kind {
            EntryKind::Dir => {
                fs::create_dir(path).map_err(io("create directory", path))?;
                // Owner-writable while children are created; the real mode comes after.
                fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io("chmod", path))?;
                self.dir_contents(e, path)?;
                self.apply_meta(path, e);
                self.report.dirs += 1;
            }
            EntryKind::File => {
                let grown = self.overlay.applied(e);
                let e = grown.as_ref();
                if e.link_group != 0 {
                    if let Some(first) = self.links.get(&e.link_group) {
                        match fs::hard_link(first, path) {
                            Ok(()) => {
                                self.report.files += 1;
                                return Ok(());
                            }
                            Err(err) => self.report.warnings.push(format!(
                                "{}: could not hard-link to {}: {err}; restoring a copy",
                                path.display(),
                                first.display()
                            )),
                        }
                    }
                }
                match self.file(e, path) {
                    Ok(()) => {
                        self.apply_meta(path, e);
                        self.report.files += 1;
                        self.report.bytes += e.size;
                        if e.link_group != 0 {
                            self.links.entry(e.link_group).or_insert_with(|| path.to_path_buf());
                        }
                    }
                    Err(err) => {
                        let _ = fs::remove_file(path);
                        match err {
                            // Every file after it would fail the same way: stop here.
                            FileFailure::Target(cause) if no_space(&cause) => {
                                return Err(RestoreError::TargetFull { path: path.to_path_buf(), cause })
                            }
                            FileFailure::Target(cause) => {
                                self.report.failed.push((path.to_path_buf(), cause.to_string()))
                            }
                            FileFailure::Repository(why) => {
                                self.report.unreadable += 1;
                                self.report.failed.push((path.to_path_buf(), why));
                            }
                        }
                    }
                }
            }
            EntryKind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.target), path).map_err(io("create symlink", path))?;
                self.apply_meta(path, e);
                self.report.others += 1;
            }
            EntryKind::Fifo | EntryKind::Socket | EntryKind::CharDevice | EntryKind::BlockDevice => {
                let kind = match e.kind {
                    EntryKind::Fifo => libc::S_IFIFO,
                    EntryKind::Socket => libc::S_IFSOCK,
                    EntryKind::CharDevice => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                let c = cpath(path);
                // SAFETY: `c` is a valid NUL-terminated path; mknod only reads it.
                let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, e.rdev as libc::dev_t) };
                if rc != 0 {
                    let err = std::io::Error::last_os_error();
                    self.report.warnings.push(format!("{}: could not recreate special file: {err}", path.display()));
                    return Ok(());
                }
                self.apply_meta(path, e);
                self.report.others += 1;
            }
        }
        Ok(())
    }

    fn file(&mut self, e: &Entry, path: &Path) -> Result<(), FileFailure> {
        let f = fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(FileFailure::Target)?;
        let mut offsets = Vec::with_capacity(e.content.len());
        let mut pos = 0u64;
        for ext in &e.content {
            if let Extent::Data(b) = ext {
                offsets.push((pos, *b));
            }
            pos += ext.len();
        }
        let repo = &self.repo;
        let result: Result<(), FileFailure> = self.handle.block_on(async {
            let mut fetched = stream::iter(
                offsets
                    .iter()
                    .map(|(off, b)| async move { repo.read_blob(BlobKind::Data, b).await.map(|data| (*off, data)) }),
            )
            .buffered(FETCH_AHEAD);
            while let Some(r) = fetched.next().await {
                let (off, data) = r.map_err(|err: RepoError| FileFailure::Repository(err.to_string()))?;
                f.write_all_at(&data, off).map_err(FileFailure::Target)?;
            }
            Ok(())
        });
        result?;
        // Holes are never written: extending the length leaves them as holes.
        f.set_len(e.size).map_err(FileFailure::Target)?;
        Ok(())
    }

    /// Sets the inode flags noted, keeping those the target's filesystem manages.
    fn apply_flags(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        for (path, flags) in std::mem::take(&mut self.flagged) {
            let set = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                .open(&path)
                .and_then(|f| set_inode_flags(&f, flags));
            if let Err(err) = set {
                self.report.warnings.push(format!("{}: inode flags {flags:#x}: {err}", path.display()));
            }
        }
    }

    fn apply_meta(&mut self, path: &Path, e: &Entry) {
        if e.flags != 0 && matches!(e.kind, EntryKind::File | EntryKind::Dir) {
            self.flagged.push((path.to_path_buf(), e.flags));
        }
        let symlink = e.kind == EntryKind::Symlink;
        for (k, v) in &e.xattrs {
            if let Err(err) = xattr::set(path, OsStr::from_bytes(k), v) {
                self.report.warnings.push(format!(
                    "{}: extended attribute {}: {err}",
                    path.display(),
                    String::from_utf8_lossy(k)
                ));
            }
        }
        let c = cpath(path);
        // SAFETY: valid NUL-terminated path; lchown does not follow symlinks.
        if unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) } != 0 {
            let err = std::io::Error::last_os_error();
            // Without root, files are restored as the user's own: not worth a warning each.
            if nix::unistd::geteuid().is_root() {
                self.report.warnings.push(format!("{}: chown {}:{}: {err}", path.display(), e.uid, e.gid));
            }
        }
        if !symlink {
            if let Err(err) = fs::set_permissions(path, fs::Permissions::from_mode(e.mode)) {
                self.report.warnings.push(format!("{}: chmod {:o}: {err}", path.display(), e.mode));
            }
        }
        if let Err(err) = set_mtime(&c, e.mtime) {
            self.report.warnings.push(format!("{}: set times: {err}", path.display()));
        }
    }
}

/// Why one file could not be restored.
enum FileFailure {
    /// Its data could not be read from the repository.
    Repository(String),
    /// The target would not take it.
    Target(std::io::Error),
}

fn no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Sets an open file's inode flags to `flags` (within `KEPT_FLAGS`), keeping the
/// others as they are.
fn set_inode_flags(f: &fs::File, flags: u32) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut current: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes at most a long into `current`, which we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new: libc::c_long = (current & !(crate::tree::KEPT_FLAGS as libc::c_long)) | flags as libc::c_long;
    // SAFETY: FS_IOC_SETFLAGS reads a long from `new`.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &new) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths built from tree names have no NUL")
}

fn set_mtime(c: &CString, t: Timestamp) -> std::io::Result<()> {
    let ts = libc::timespec { tv_sec: t.sec as libc::time_t, tv_nsec: t.nsec as libc::c_long };
    let times = [ts, ts];
    // SAFETY: valid path and a two-element timespec array, as utimensat requires.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn prepare_target(target: &Path) -> Result<(), RestoreError> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(target).map_err(io("read", target))?;
            if entries.next().is_some() {
                return Err(RestoreError::TargetNotEmpty(target.to_path_buf()));
            }
            Ok(())
        }
        Ok(_) => Err(RestoreError::TargetNotEmpty(target.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::create_dir_all(target).map_err(io("create", target)),
        Err(e) => Err(io("stat", target)(e)),
    }
}

impl From<BlobError> for RestoreError {
    fn from(e: BlobError) -> RestoreError {
        RestoreError::Repo(e.into())
    }
}
