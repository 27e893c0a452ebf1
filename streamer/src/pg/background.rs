//! What the helpers that work ahead of PostgreSQL's calls share: the archive
//! pusher (`archive::ReadAhead`) and the WAL fetcher (`spool::Spool`) each keep a
//! directory where at most one of them runs, under a lock file there, and leave
//! notes that the short-lived calls PostgreSQL makes read. A note must appear
//! whole, since a call reads it as soon as it is there.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

/// A pusher exits after this long with nothing to push; a fetcher after this long
/// with no call from PostgreSQL. A helper that is gone costs the next call a
/// process start, one that lingers costs nothing but a process.
pub const PUSHER_IDLE: Duration = Duration::from_secs(2);
/// Longer than the pusher's: replaying one segment can take seconds, and the
/// segments fetched ahead are dropped when the fetcher exits.
pub const FETCHER_IDLE: Duration = Duration::from_secs(10);

fn lock_file(dir: &Path) -> std::io::Result<File> {
    std::fs::create_dir_all(dir)?;
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock"))
}

/// The lock of the helper of `dir`, if no other helper holds it: held while the
/// returned file is open.
pub fn lock(dir: &Path) -> std::io::Result<Option<File>> {
    let f = lock_file(dir)?;
    Ok(f.try_lock().is_ok().then_some(f))
}

/// Whether a helper holds the lock of `dir`.
pub fn running(dir: &Path) -> bool {
    match lock_file(dir) {
        Ok(f) => f.try_lock().is_err(),
        Err(_) => false,
    }
}

/// Writes `bytes` as `dir/name`: aside first, then renamed, so that a reader sees
/// the whole note or none.
pub fn write_note(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_helper_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("helper");
        assert!(!running(&d), "none runs yet");
        let held = lock(&d).unwrap().expect("the first takes the lock");
        assert!(running(&d));
        assert!(lock(&d).unwrap().is_none(), "a second helper does not start");
        drop(held);
        assert!(!running(&d));
        write_note(&d, "n", b"whole").unwrap();
        assert_eq!(std::fs::read(d.join("n")).unwrap(), b"whole");
        assert!(!d.join(".n.tmp").exists());
    }
}
