//! What a running stream tells the rest of the host: one small JSON file per stream,
//! rewritten (atomically) every second. `ebb status` reads it, so the lag and the
//! last error are known even while the store is unreachable. A stream that stops
//! writing it (killed, hung) goes on aging: its lag grows until the RPO alarm fires.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A stream whose file is older than this is not running.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamState {
    pub source: String,
    /// The repository URL, as given.
    pub repository: String,
    pub kind: String,
    /// What is shipped: a directory.
    pub path: String,
    pub pid: u32,
    pub rpo_secs: u64,
    pub started: Timestamp,
    /// When this file was last written: the stream's heartbeat.
    pub updated: Timestamp,
    /// Everything the source held at this time is durable in the repository.
    pub durable_as_of: Timestamp,
    /// The time of the newest point this stream made or found.
    pub newest_point: Option<Timestamp>,
    pub last_error: Option<String>,
    pub last_error_at: Option<Timestamp>,
    /// The last forget and prune the stream ran (`--prune-every`).
    #[serde(default)]
    pub last_prune: Option<PruneStatus>,
}

/// How a forget and prune run by a stream went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PruneStatus {
    /// When it ended.
    pub at: Timestamp,
    /// What it did, in a line.
    pub summary: String,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl StreamState {
    /// The state of a stream of this process that starts now: nothing is pending yet.
    pub fn starting(source: String, repository: String, kind: &str, path: String, rpo: Duration) -> StreamState {
        let now = Timestamp::now();
        StreamState {
            source,
            repository,
            kind: kind.into(),
            path,
            pid: std::process::id(),
            rpo_secs: rpo.as_secs(),
            started: now,
            updated: now,
            durable_as_of: now,
            newest_point: None,
            last_error: None,
            last_error_at: None,
            last_prune: None,
        }
    }

    /// Now minus the newest durable state. A stream that stopped writing its file
    /// vouches for nothing after its last heartbeat.
    pub fn lag(&self, now: Timestamp) -> Duration {
        let since = now.duration_since(self.durable_as_of);
        Duration::try_from(since).unwrap_or_default()
    }

    pub fn running(&self, now: Timestamp) -> bool {
        Duration::try_from(now.duration_since(self.updated)).unwrap_or_default() < STALE_AFTER && pid_alive(self.pid)
    }

    pub fn breached(&self, now: Timestamp) -> bool {
        self.lag(now) > Duration::from_secs(self.rpo_secs)
    }
}

/// Whether a process of this host still runs.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The directory of stream state files: `EBB_STATE_DIR`, else `/var/lib/ebb/state`
/// for root, else `$XDG_STATE_HOME/ebb` or `~/.local/state/ebb`.
pub fn default_state_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EBB_STATE_DIR") {
        return Some(PathBuf::from(d));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/lib/ebb/state"));
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|d| d.join("ebb"))
}

/// `dir`, created if needed with mode 0700, checked to be a directory of this
/// user's that no one else can write to: where this host's ebb keeps files that a
/// local user must not be able to plant or read (logs, state).
pub fn private_dir(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    create_dirs(dir)?;
    let m = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory of this user's that only it can write to (owner {}, mode {:o})",
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(dir.to_path_buf())
}

/// Creates `dir` and its missing parents, mode 0700.
fn create_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Creates `path` afresh (mode 0600), replacing a file there but never following a
/// symlink or writing into a file someone else planted: what was at the name is
/// unlinked, and the new file must be the one created.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// The file of one stream: per source and repository.
pub fn state_file(dir: &Path, repository: &str, source: &str) -> PathBuf {
    let h = Sha256::digest(repository.as_bytes());
    dir.join(format!("{source}-{}.json", hex::encode(&h[..6])))
}

/// Another stream of a source runs on this host.
#[derive(Debug, thiserror::Error)]
#[error("a stream of {source_name} to {repository} is already running (pid {pid}); one writer per source")]
pub struct AlreadyRunning {
    pub source_name: String,
    pub repository: String,
    pub pid: u32,
}

/// The state file of a stream of `source` to `repository`, in `dir` or else the
/// default state directory, once no other stream of it is seen running there: one
/// writer per source. `None` when there is no state directory: the stream runs, but
/// `ebb status` will not see it.
pub fn claim(dir: Option<PathBuf>, repository: &str, source: &str) -> Result<Option<PathBuf>, AlreadyRunning> {
    let Some(file) = dir.or_else(default_state_dir).map(|dir| state_file(&dir, repository, source)) else {
        tracing::warn!("no state directory (set EBB_STATE_DIR or HOME): `ebb status` will not see this stream");
        return Ok(None);
    };
    if let Some(other) = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice::<StreamState>(&b).ok()) {
        if other.running(Timestamp::now()) && other.pid != std::process::id() {
            return Err(AlreadyRunning {
                source_name: source.to_string(),
                repository: repository.to_string(),
                pid: other.pid,
            });
        }
    }
    Ok(Some(file))
}

/// Writes the state beside its place (a file of its own, mode 0600), then renames
/// it there.
pub fn write(path: &Path, state: &StreamState) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        create_dirs(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    create_private(&tmp)?.write_all(&serde_json::to_vec_pretty(state).expect("state serializes"))?;
    std::fs::rename(&tmp, path)
}

/// Every stream state in `dir` that belongs to `repository`.
pub fn read_all(dir: &Path, repository: &str) -> std::io::Result<Vec<StreamState>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let p = e?.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&p).map(|b| serde_json::from_slice::<StreamState>(&b)) {
            Ok(Ok(s)) if s.repository == repository => out.push(s),
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::warn!("ignoring {}: {err}", p.display()),
            Err(err) => tracing::warn!("cannot read {}: {err}", p.display()),
        }
    }
    out.sort_by(|a, b| a.source.cmp(&b.source));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32, updated: Timestamp) -> StreamState {
        StreamState {
            source: "s".into(),
            repository: "file:///r".into(),
            kind: "dir".into(),
            path: "/p".into(),
            pid,
            rpo_secs: 60,
            started: updated,
            updated,
            durable_as_of: updated,
            newest_point: None,
            last_error: None,
            last_error_at: None,
            last_prune: None,
        }
    }

    #[test]
    fn a_source_is_claimed_unless_another_live_stream_writes_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let claim_here = || claim(Some(dir.path().to_path_buf()), "file:///r", "s");
        let file = claim_here().unwrap().expect("a state directory was given");
        assert_eq!(file, state_file(dir.path(), "file:///r", "s"));
        assert!(claim(Some(dir.path().to_path_buf()), "file:///other", "s").unwrap() != Some(file.clone()));

        let now = Timestamp::now();
        // pid 1 is alive in every pid namespace.
        write(&file, &state(1, now)).unwrap();
        let e = claim_here().unwrap_err();
        assert_eq!(e.pid, 1);
        assert_eq!(e.to_string(), "a stream of s to file:///r is already running (pid 1); one writer per source");
        // This process's own earlier state, a stale one, and an unreadable one do not stop it.
        write(&file, &state(std::process::id(), now)).unwrap();
        assert!(claim_here().is_ok());
        write(&file, &state(1, now - jiff::SignedDuration::from_secs(60))).unwrap();
        assert!(claim_here().is_ok());
        std::fs::write(&file, b"{").unwrap();
        assert!(claim_here().is_ok());
    }
}
