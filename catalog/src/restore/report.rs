//! What a restore did: the report at its end, and the counters a caller reads
//! while it runs.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

/// What a running restore has done so far; read it from another task to show
/// progress. The totals are known when the whole point is restored (from its
/// manifest), and zero otherwise.
#[derive(Debug, Default)]
pub struct Progress {
    /// Files written, linked or found unchanged.
    pub files: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Bytes fetched from the repository.
    pub fetched: AtomicU64,
    pub total_files: AtomicU64,
    pub total_bytes: AtomicU64,
}

#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Files written (hard links to them included).
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Bytes of the files written.
    pub bytes: u64,
    /// Files already in the target with the point's content (`overwrite`): kept,
    /// with the point's metadata applied.
    pub unchanged: u64,
    pub unchanged_bytes: u64,
    /// Entries of the target that the point does not have, or of another kind,
    /// removed (`overwrite`).
    pub removed: u64,
    /// Bytes fetched from the repository.
    pub fetched: u64,
    /// Entries that could not be restored: (path, reason). Their files are not left behind.
    pub failed: Vec<(PathBuf, String)>,
    /// How many of those failed because the repository could not give their data
    /// (damaged or missing), rather than because of the target.
    pub unreadable: usize,
    /// Metadata that could not be applied (e.g. ownership when not root).
    pub warnings: Vec<String>,
}
