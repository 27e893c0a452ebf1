//! Sources that produce recovery points. Today: snapshots of a directory tree
//! (`ebb backup`); continuous shipping and PostgreSQL come next.

mod metadata;
mod prefetch;
mod snapshot;

pub use snapshot::{snapshot, Counters, SnapshotError, SnapshotOptions};
