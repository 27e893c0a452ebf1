//! What every command needs: where the repository is and opening it (with the
//! file modes it asks for), the host and source names, and how a walk of a tree is
//! set up (what it leaves out, how many threads read), and the restore_command a
//! server started by ebb runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use catalog::{Found, RepoError, Repository, Store};

use crate::cli::{Global, UsageError};
use crate::secret::secret;
use streamer::pg::delegate::{self, SecretFile};

/// The repository URL: --repo, EBB_REPOSITORY, or the default on the local disk.
pub fn repo_url(g: &Global) -> Result<String> {
    if let Some(url) = &g.repo {
        return Ok(catalog::canonical_url(url));
    }
    let dir = if nix::unistd::geteuid().is_root() {
        std::path::PathBuf::from("/var/lib/ebb/repository")
    } else {
        let data = std::env::var_os("XDG_DATA_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/share")))
            .context("cannot find a default repository: set HOME, or pass --repo / EBB_REPOSITORY")?;
        data.join("ebb/repository")
    };
    Ok(format!("file://{}", dir.display()))
}

pub async fn open(g: &Global) -> Result<Repository> {
    let found = find(g).await?;
    let secret = secret(g, false)?;
    Ok(found.unlock(&secret).await?)
}

/// A file:// repository whose `config` its group may read is shared with that
/// group (the PostgreSQL server's user running restore_command, say): what ebb
/// adds to it is group-readable too, 0640 and 0750, as restic does. One whose
/// `config` every user may read (made before ebb kept repositories private) stays
/// as it is, with a warning: other users may rely on reading it. Any other
/// repository gets files 0600 and directories 0700 (the umask `main` sets).
fn follow_repository_modes(url: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Some(dir) = url.strip_prefix("file://") else { return };
    let Ok(m) = std::fs::metadata(std::path::Path::new(dir).join("config")) else { return };
    let mode = m.permissions().mode();
    let umask = if mode & 0o004 != 0 {
        tracing::warn!(
            "the repository at {dir} can be read by every user of this host, key slots included: \
             `chmod -R go-rwx {dir}` makes it private (or `chmod -R o-rwx {dir}` shares it with its group only)"
        );
        0o022
    } else if mode & 0o040 != 0 {
        0o027
    } else {
        return;
    };
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(umask) };
}

/// The repository, once its header object is known to be there and sound: no
/// password is asked for a repository that does not exist.
pub async fn find(g: &Global) -> Result<Found> {
    let url = repo_url(g)?;
    follow_repository_modes(&url);
    let store = Store::open(&url, false).map_err(|e| match e {
        catalog::StoreError::NotFound { .. } => anyhow::anyhow!(RepoError::NoRepository { url: url.clone() }),
        other => anyhow::anyhow!(other),
    })?;
    Repository::find(store).await.map_err(|e| match e {
        e @ RepoError::Config(_) => anyhow::anyhow!(e).context(format!(
            "open repository {url}: its header object is damaged; restore `config` from a copy of the repository"
        )),
        e => e.into(),
    })
}

pub fn host() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into())
}

/// The source name given, or the host name made into one.
pub fn source_or_host(source: Option<String>) -> Result<String> {
    Ok(match source {
        Some(s) => s,
        None => {
            let h: String = host()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '-' })
                .collect();
            catalog::validate_source(&h).map_err(|e| UsageError(format!("{e}; pass --source NAME")))?;
            h
        }
    })
}

/// The `--exclude` set of a walk of `path`: the user's patterns, and the directories
/// of ebb's own that lie inside it (the repository, which a backup of it would copy
/// into itself, growing every run; a stream's state, which changes every second).
pub fn walk_excludes(
    g: &Global,
    patterns: &[String],
    path: &Path,
    own: &[PathBuf],
) -> Result<Arc<streamer::PathPatterns>> {
    let root = std::fs::canonicalize(path).map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
    let mut excludes =
        streamer::PathPatterns::below("--exclude", patterns, Some(&root)).map_err(|e| UsageError(e.to_string()))?;
    let repo = repo_url(g)?.strip_prefix("file://").map(PathBuf::from);
    for dir in repo.iter().chain(own) {
        let Ok(dir) = std::fs::canonicalize(dir) else { continue };
        if let Ok(rel) = dir.strip_prefix(&root) {
            if rel.as_os_str().is_empty() {
                return Err(UsageError(format!("{} is ebb's own {} itself", root.display(), dir.display())).into());
            }
            eprintln!("warning: {} lies inside {}: it is left out", dir.display(), root.display());
            excludes.skip(rel.to_path_buf());
        }
    }
    Ok(Arc::new(excludes))
}

/// Threads reading files during a walk.
pub fn file_workers() -> usize {
    4 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 4)
}

/// The restore_command a restored server runs: this ebb, this repository, the same
/// key or password file, so nothing secret is written into the data directory.
pub fn archive_get_command(g: &Global, source: &str, prefetch: usize) -> Result<String> {
    let exe = std::env::current_exe().context("find the ebb executable")?;
    let url = repo_url(g)?;
    let secret = match (&g.key_file, &g.password_file) {
        (Some(k), _) => SecretFile::Key(k),
        (None, Some(p)) => SecretFile::Password(p),
        (None, None) => {
            return Err(UsageError(
                "PostgreSQL fetches WAL by running ebb itself (restore_command), as the server's user: give the \
                 secret as --key-file or --password-file (EBB_KEY_FILE, EBB_PASSWORD_FILE), a file that user can read"
                    .into(),
            )
            .into())
        }
    };
    Ok(delegate::archive_get_command(&exe, &url, secret, source, prefetch)?)
}
