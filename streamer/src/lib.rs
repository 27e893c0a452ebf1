//! Sources that produce recovery points. Today: snapshots of a directory tree
//! (`ebb backup`); continuous shipping and PostgreSQL come next.

mod appends;
mod exclude;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod metadata;
pub mod metrics;
pub mod pg;
mod prefetch;
mod snapshot;
pub mod state;
mod stream;

pub use exclude::{ExcludeError, Excludes};
pub use snapshot::{capture, previous_top, snapshot, Capture, Counters, SnapshotError, SnapshotOptions, TreeCache};
pub use stream::{stream_dir, StreamError, StreamOptions};
