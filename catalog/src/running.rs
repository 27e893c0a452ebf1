//! The marks of a repository's writers on this host, so that a writer learns
//! without listing every pack whether one before it may have left packs that no
//! index file names (it was killed, or its index file could not be written).
//!
//! Each writer holds a mark, a file in `<cache dir>/writers-<repository id hex>/`
//! that it keeps locked (`flock`) while it runs. It removes the mark when it ends
//! with every pack it stored named in an index file; otherwise the mark stays,
//! unlocked. A mark that can be locked by someone else is such a leftover: the next
//! writer that adopts orphans lists the packs, adopts what no index names, and then
//! removes the leftovers (its own mark now covers what it adopted). A mark is made
//! under a hidden name and locked before it is renamed into place, so that no one
//! sees it unlocked while its writer lives. Nothing here is trusted for safety:
//! a lost or stray mark costs a listing, or packs stored again, never data.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::id::Id;

/// This writer's mark, locked while it lives.
#[derive(Debug)]
pub struct Mark {
    path: PathBuf,
    /// Held open for its lock, which the process's end releases.
    _file: File,
}

/// What a writer found among the marks when it made its own.
#[derive(Debug)]
pub struct Marks {
    pub own: Mark,
    /// Marks left by writers that are gone.
    pub leftovers: Vec<PathBuf>,
}

impl Mark {
    /// Makes and locks a mark in `dir` (made if missing), and finds the leftovers
    /// there. `None` (with a warning) if the directory cannot be used.
    pub fn take(dir: &Path) -> Option<Marks> {
        match Mark::try_take(dir) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("cannot keep a writer's mark in {}: {e}", dir.display());
                None
            }
        }
    }

    fn try_take(dir: &Path) -> std::io::Result<Marks> {
        std::fs::create_dir_all(dir)?;
        let name = Id::random().to_hex();
        let hidden = dir.join(format!(".{name}"));
        let file = File::create(&hidden)?;
        file.lock()?;
        let path = dir.join(&name);
        std::fs::rename(&hidden, &path)?;
        let mut leftovers = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let leaf = entry.file_name();
            let Some(leaf) = leaf.to_str() else { continue };
            if leaf.starts_with('.') || leaf == name {
                continue;
            }
            let Ok(other) = File::open(entry.path()) else { continue };
            // Lockable: its writer is gone. The lock goes with the file handle.
            if other.try_lock().is_ok() {
                leftovers.push(entry.path());
            }
        }
        leftovers.sort();
        Ok(Marks { own: Mark { path, _file: file }, leftovers })
    }

    /// Removes the mark: its writer left nothing unindexed.
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!("cannot remove the writer's mark {}: {e}", self.path.display());
        }
    }
}

/// Removes marks left by writers that are gone, once what they left is adopted.
pub fn remove_leftovers(leftovers: &[PathBuf]) {
    for path in leftovers {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove the writer's mark {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_a_leftover_only_once_its_writer_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Mark::take(dir.path()).unwrap();
        assert!(first.leftovers.is_empty());
        let second = Mark::take(dir.path()).unwrap();
        assert!(second.leftovers.is_empty(), "a running writer's mark is no leftover");

        // Gone without removing its mark (its file handle closed: killed).
        let path = first.own.path.clone();
        drop(first);
        let third = Mark::take(dir.path()).unwrap();
        assert_eq!(third.leftovers, vec![path.clone()]);
        remove_leftovers(&third.leftovers);
        assert!(!path.exists());

        // Ended with nothing unindexed: no leftover.
        second.own.remove();
        third.own.remove();
        assert!(Mark::take(dir.path()).unwrap().leftovers.is_empty());
    }
}
