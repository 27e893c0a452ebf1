//! Live progress of a snapshot, for a progress bar: the walk counts the files it
//! takes unchanged, the workers what they read.

use std::sync::atomic::AtomicU64;

/// Live progress, for a progress bar.
#[derive(Debug, Default)]
pub struct Counters {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_read: AtomicU64,
}
