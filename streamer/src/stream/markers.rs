//! The directory where a stream's watcher marks time: one per running stream, in
//! the temporary directory, locked while the stream holds it. A stream killed
//! with -9 cannot remove its own, so each stream that starts removes those that
//! no running stream holds.

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The start of every such directory's name.
const PREFIX: &str = "ebb-stream-markers-";
/// The file its stream holds locked, and the name it is made under, locked, before
/// it is renamed into place: a directory without `LOCK` is one being made.
const LOCK: &str = "lock";
const LOCK_NEW: &str = "lock.new";
/// A directory without a lock this old was left by a stream of a version that did
/// not lock it (a running stream's marks change it four times a second).
const UNLOCKED_AGE: Duration = Duration::from_secs(24 * 3600);

/// A markers directory, removed when dropped.
pub(super) struct Markers {
    dir: tempfile::TempDir,
    _lock: File,
}

impl Markers {
    /// Removes the markers directories no stream holds, then makes one in the
    /// temporary directory.
    pub(super) fn create() -> io::Result<Markers> {
        Markers::create_in(&std::env::temp_dir())
    }

    fn create_in(parent: &Path) -> io::Result<Markers> {
        sweep(parent);
        let dir = tempfile::Builder::new().prefix(PREFIX).tempdir_in(parent)?;
        let lock = File::create(dir.path().join(LOCK_NEW))?;
        lock.try_lock().map_err(io::Error::from)?;
        fs::rename(dir.path().join(LOCK_NEW), dir.path().join(LOCK))?;
        Ok(Markers { dir, _lock: lock })
    }

    pub(super) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes every markers directory in `parent` that no stream holds. What cannot
/// be read or removed is left: another user's, or one in use.
fn sweep(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let dir = entry.path();
        if abandoned(&dir) {
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::debug!("cannot remove {}, left by a stream no longer running: {e}", dir.display());
            }
        }
    }
}

/// Whether no stream holds `dir`: its lock can be taken (and is, until the
/// directory is gone), or it has none and is old.
fn abandoned(dir: &Path) -> bool {
    match File::open(dir.join(LOCK)) {
        Ok(lock) => lock.try_lock().is_ok(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::metadata(dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).is_ok_and(|age| age > UNLOCKED_AGE)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory left by a stream killed with -9 (its lock free) and one left
    /// long ago by a stream that did not lock go; those of running streams, and
    /// one being made, stay.
    #[test]
    fn a_starting_stream_removes_the_markers_no_running_stream_holds() {
        let parent = tempfile::tempdir().unwrap();
        let running = Markers::create_in(parent.path()).unwrap();
        let killed = parent.path().join(format!("{PREFIX}killed"));
        fs::create_dir(&killed).unwrap();
        File::create(killed.join(LOCK)).unwrap();
        File::create(killed.join("17")).unwrap();
        let old = parent.path().join(format!("{PREFIX}old"));
        fs::create_dir(&old).unwrap();
        File::open(&old).unwrap().set_modified(SystemTime::now() - 2 * UNLOCKED_AGE).unwrap();
        let being_made = parent.path().join(format!("{PREFIX}new"));
        fs::create_dir(&being_made).unwrap();
        let other = parent.path().join("other");
        fs::create_dir(&other).unwrap();

        let started = Markers::create_in(parent.path()).unwrap();
        assert!(!killed.exists(), "the markers of a stream killed with -9 are removed");
        assert!(!old.exists(), "markers left long ago without a lock are removed");
        for kept in [running.path(), started.path(), being_made.as_path(), other.as_path()] {
            assert!(kept.exists(), "{} is kept", kept.display());
        }
        // A stream that stops removes its own.
        let path = running.path().to_path_buf();
        drop(running);
        assert!(!path.exists());
    }
}
