//! Sources that produce recovery points: snapshots of a directory tree (`ebb
//! backup`), a directory streamed as points and appended logs as fragments (`ebb
//! stream dir`), and PostgreSQL (WAL streamed like a replica, base backups,
//! archive-push/get, restores to an exact time). It reads hosts and talks to
//! PostgreSQL; what it stores, and how, is catalog's.

mod appends;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod metadata;
pub mod metrics;
mod patterns;
pub mod pg;
mod prefetch;
mod snapshot;
pub mod state;
mod stream;
pub mod upkeep;

pub use patterns::{PathPatterns, PatternError};
pub use snapshot::{capture, previous_top, snapshot, Capture, Counters, SnapshotError, SnapshotOptions, TreeCache};
pub use stream::{stream_dir, StreamError, StreamOptions};
