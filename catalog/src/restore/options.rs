//! What a restore is asked to do: the options and their defaults.

use std::path::PathBuf;
use std::sync::Arc;

use super::report::Progress;
use crate::fragment::Overlay;

/// The memory a restore uses by default: `RestoreOptions::memory`.
pub const DEFAULT_MEMORY: usize = 256 << 20;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Restore only this path of the point (relative to the backed-up directory); it
    /// lands as `target/<its name>`.
    pub path: Option<Vec<u8>>,
    pub target: PathBuf,
    /// The appends after the point, up to the moment restored (`Repository::overlay`).
    pub overlay: Overlay,
    /// Restore over what the target holds: keep files that already have the
    /// point's content, replace the others, remove what the point does not have.
    /// Without it, the target must be a new or empty directory.
    pub overwrite: bool,
    /// The memory budget, in bytes (`DEFAULT_MEMORY`).
    pub memory: usize,
    /// Start writing each file to disk as soon as it is complete (without waiting
    /// for it), for a restore a sync of the whole target follows: PostgreSQL's
    /// start syncs its data directory, which then finds little left to write.
    pub write_back: bool,
    /// Where the restore counts what it did, for a caller to show while it runs.
    pub progress: Arc<Progress>,
}

impl Default for RestoreOptions {
    fn default() -> RestoreOptions {
        RestoreOptions {
            path: None,
            target: PathBuf::new(),
            overlay: Overlay::default(),
            overwrite: false,
            memory: DEFAULT_MEMORY,
            write_back: false,
            progress: Arc::default(),
        }
    }
}
