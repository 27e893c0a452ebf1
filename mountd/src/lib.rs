//! The read-only filesystem that shows any moment of a repository: an async core
//! (`fs`) that knows nothing of FUSE, a thin `fuser` adapter (`fuse`), and what the
//! mount table says of a path (`mounts`). A branch (`branch`) makes a point's files
//! writable, every change kept on local disk and none in the repository.

pub mod branch;
mod branch_fuse;
mod cache;
mod error;
mod fs;
mod fuse;
pub mod mounts;

pub use branch_fuse::mount_branch;
pub use cache::DiskCache;
pub use error::FsError;
pub use fs::{Attr, Data, Fs, Kind, Scope, ROOT};
pub use fuse::{mount, MountHandle};
