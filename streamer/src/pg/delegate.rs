//! What ebb leaves to other processes of its own for PostgreSQL: the
//! restore_command a restored server runs (this ebb again, with the same repository
//! and secret file, so nothing secret is written into the data directory), the
//! background pusher an `archive-push` call hands its segment to (`ReadAhead`), and
//! the background fetcher that fills the spool `archive-get` calls take their
//! segments from (`Spool`), each started when none runs.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use catalog::wal::Lsn;

use super::archive::{Delegated, ReadAhead};
use super::names::is_segment_name;
use super::spool::Spool;
use crate::state;

/// The file that unlocks the repository, which a process ebb starts reads too.
#[derive(Debug, Clone, Copy)]
pub enum SecretFile<'a> {
    Key(&'a Path),
    Password(&'a Path),
}

/// A word for `sh -c`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The restore_command a restored server runs: `exe` fetching WAL of `source` from
/// `repository`, unlocked by `secret` (made absolute: the server runs it from its
/// data directory), `prefetch` segments ahead of the server's calls.
pub fn archive_get_command(
    exe: &Path,
    repository: &str,
    secret: SecretFile<'_>,
    source: &str,
    prefetch: usize,
) -> std::io::Result<String> {
    let mut cmd = vec![shell_quote(&exe.to_string_lossy()), "--repo".into(), shell_quote(repository)];
    let absolute = |p: &Path| std::path::absolute(p).map(|p| shell_quote(&p.to_string_lossy()));
    match secret {
        SecretFile::Key(k) => cmd.extend(["--key-file".into(), absolute(k)?]),
        SecretFile::Password(p) => cmd.extend(["--password-file".into(), absolute(p)?]),
    }
    cmd.extend(["pg".into(), "archive-get".into(), "--source".into(), shell_quote(source)]);
    if prefetch > 0 {
        cmd.extend(["--prefetch".into(), prefetch.to_string()]);
    }
    Ok(cmd.join(" "))
}

/// Where the segments pushed ahead for `source` to `repository` are noted: beside
/// its stream state, in `state_dir` or else the default state directory. `None`
/// when pushing ahead is off (`segments` is 0) or there is no state directory.
pub fn read_ahead(state_dir: Option<PathBuf>, repository: &str, source: &str, segments: usize) -> Option<ReadAhead> {
    state_dir.or_else(state::default_state_dir).filter(|_| segments > 0).map(|dir| {
        let file = state::state_file(&dir, repository, source);
        ReadAhead { dir: file.with_extension("pushed"), segments }
    })
}

/// Where the segments fetched ahead of calls that fetch into `dest` wait: `dir`,
/// or else `ebb-spool` beside `dest` (in the server's `pg_wal`, so that a segment
/// moves into place by a rename). `None` when fetching ahead is off (`segments` is
/// 0).
pub fn spool(dir: Option<PathBuf>, dest: &Path, segments: usize, until: Option<Lsn>) -> Option<Spool> {
    let beside = || dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("ebb-spool");
    // Absolute: the fetcher leaves the directory it was started in.
    let absolute = |dir: PathBuf| std::path::absolute(&dir).unwrap_or(dir);
    (segments > 0).then(|| Spool { dir: absolute(dir.unwrap_or_else(beside)), segments, until })
}

/// Why a helper (the archive pusher, the WAL fetcher) could not be started or
/// handed its work.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("find the ebb executable")]
    Exe(#[source] std::io::Error),
    #[error("create {}", .0.display())]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("open {}", .0.display())]
    Log(PathBuf, #[source] std::io::Error),
    #[error("start the {0}")]
    Start(&'static str, #[source] std::io::Error),
    #[error("{}", .0.display())]
    Spool(PathBuf, #[source] std::io::Error),
    /// The pusher could not push the segment, and said why.
    #[error("{0}")]
    Failed(String),
}

/// Leaves the file at `path` to the background pusher, if it takes it: said at
/// once when it was pushed ahead already, else once the pusher has pushed it
/// (started as this program with `args` when none runs). `None`: the pusher does
/// not take it, or went away without pushing it; the caller pushes it itself.
pub async fn push_ahead(
    ra: &ReadAhead,
    path: &Path,
    args: impl IntoIterator<Item = OsString>,
) -> Result<Option<String>, HelperError> {
    if ra.pushed(path) {
        return Ok(Some(format!("{} was already archived (pushed ahead)", path.display())));
    }
    if !ra.takes(path) {
        return Ok(None);
    }
    let started = if ra.pusher_running() { None } else { Some(start_helper(&ra.dir, PUSHER, args)?) };
    match ra.wait(path, started).await {
        Delegated::Pushed => Ok(Some(format!("archived {}", path.display()))),
        Delegated::Failed(why) => Err(HelperError::Failed(why)),
        Delegated::PusherGone => Ok(None),
    }
}

/// Moves segment `name` into `dest` from the spool when it was fetched ahead (or
/// waits while the fetcher fetches it), and keeps the fetcher going ahead of
/// PostgreSQL: started as this program with `args` when none runs. Needs no
/// repository. `false`: the caller fetches `name` itself (not a segment, not
/// fetched ahead, or not in the repository when the fetcher looked).
pub async fn fetch_ahead(
    spool: &Spool,
    name: &str,
    dest: &Path,
    args: impl IntoIterator<Item = OsString>,
) -> Result<bool, HelperError> {
    if !is_segment_name(name) {
        return Ok(false);
    }
    let err = |e| HelperError::Spool(spool.dir.clone(), e);
    // Only this user may put files here: they are handed to PostgreSQL as WAL.
    state::private_dir(&spool.dir).map_err(|e| HelperError::Dir(spool.dir.clone(), e))?;
    let taken = spool.take(name, dest).map_err(err)?;
    spool.ask(name).map_err(err)?;
    let started = if spool.fetcher_running() { None } else { Some(start_helper(&spool.dir, FETCHER, args)?) };
    if taken {
        return Ok(true);
    }
    if !spool.fetching(name) {
        return Ok(false);
    }
    spool.wait(name, dest, started).await.map_err(err)
}

/// A helper: what it is called, and the file its messages go to.
struct Helper(&'static str, &'static str);
const PUSHER: Helper = Helper("archive pusher", "pusher.log");
const FETCHER: Helper = Helper("WAL fetcher", "fetcher.log");

/// Starts this program again with `args` as a background helper, detached (a
/// session of its own), with its messages in `dir/pusher.log` or
/// `dir/fetcher.log` (of the last one).
fn start_helper(dir: &Path, helper: Helper, args: impl IntoIterator<Item = OsString>) -> Result<Child, HelperError> {
    let exe = std::env::current_exe().map_err(HelperError::Exe)?;
    state::private_dir(dir).map_err(|e| HelperError::Dir(dir.to_path_buf(), e))?;
    let log = dir.join(helper.1);
    let log = state::create_private(&log).map_err(|e| HelperError::Log(log, e))?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: setsid is async-signal-safe; the helper outlives this call.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| HelperError::Start(helper.0, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_for_the_shell() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote("it's a b"), r"'it'\''s a b'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn the_restore_command_runs_this_ebb_with_the_same_secret_file() {
        let exe = Path::new("/opt/e bb/ebb");
        let key = archive_get_command(exe, "s3://b/p", SecretFile::Key(Path::new("/k/key")), "db's", 0).unwrap();
        assert_eq!(key, r"'/opt/e bb/ebb' --repo 's3://b/p' --key-file '/k/key' pg archive-get --source 'db'\''s'");
        let pw = archive_get_command(exe, "file:///r", SecretFile::Password(Path::new("pw")), "db", 8).unwrap();
        assert!(pw.ends_with("pg archive-get --source 'db' --prefetch 8"), "{pw}");
        let cwd = std::env::current_dir().unwrap().join("pw");
        assert!(pw.contains(&format!("--password-file '{}' ", cwd.display())), "{pw}: made absolute");
    }

    #[test]
    fn pushing_ahead_needs_segments_and_a_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_ahead(Some(dir.path().into()), "file:///r", "db", 0).is_none());
        let ra = read_ahead(Some(dir.path().into()), "file:///r", "db", 4).unwrap();
        assert_eq!(ra.segments, 4);
        assert_eq!(ra.dir, state::state_file(dir.path(), "file:///r", "db").with_extension("pushed"));
    }

    #[tokio::test]
    async fn a_file_the_pusher_does_not_take_is_left_to_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let ra = ReadAhead { dir: dir.path().join("pushed"), segments: 4 };
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(wal.join("archive_status")).unwrap();
        // A segment PostgreSQL has not marked ready, and a file that is no segment.
        let segment = wal.join("000000010000000000000001");
        std::fs::write(&segment, b"x").unwrap();
        std::fs::write(wal.join("00000001.history"), b"x").unwrap();
        assert_eq!(push_ahead(&ra, &segment, Vec::new()).await.unwrap(), None);
        assert_eq!(push_ahead(&ra, &wal.join("00000001.history"), Vec::new()).await.unwrap(), None);
        assert!(!ra.dir.exists(), "no pusher was started");
    }
}
